// Integer hash table on linearized (batch, z, y, x) keys, shared by the sparse rulebook stages.
// Open addressing with linear probing over buckets of two (key, value) slots; every update is an
// int atomic (compare-and-swap, max), so it runs on any Vulkan 1.1 device (no float or 64-bit
// atomics). The including shader declares
//   buffer ... { ivec4 htab[]; }   // buckets (key0, value0, key1, value1); key HASH_EMPTY if free
// A lookup reads a whole bucket in one 16-byte load: lavapipe runs every buffer access lane by
// lane, and with the host's sizing (at most a quarter of the slots used) nearly every lookup ends
// in its first bucket. The bucket count is a power of two; the probe loops stay bounded so a bug
// cannot hang the device.
#ifndef VKCONV_SPARSE_HASH_GLSL
#define VKCONV_SPARSE_HASH_GLSL

#define HASH_EMPTY (-1)

// Linear index of batch b, site c = (z, y, x) in a grid of `shape` = (D, H, W); the host checks
// that batch_size x D x H x W fits in a non-negative int32.
int sparse_linear(int b, ivec3 c, ivec3 shape)
{
    return ((b * shape.x + c.x) * shape.y + c.y) * shape.z + c.z;
}

// A 32-bit integer mixer (xor-shift-multiply rounds): neighbouring voxels have consecutive keys,
// which linear probing would otherwise pile into one long run.
uint sparse_hash(int key)
{
    uint h = uint(key);
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    return h;
}

// Slot (2 * bucket + 0 or 1) holding `key` after inserting it if absent; -1 only if the table is
// full (never at the host's load factor). The value of slot q is htab[q / 2][2 * (q % 2) + 1].
int hash_insert(int key, uint mask)
{
    uint bucket = sparse_hash(key) & mask;
    for (uint probe = 0u; probe <= mask; ++probe) {
        int prev = atomicCompSwap(htab[bucket].x, HASH_EMPTY, key);
        if (prev == HASH_EMPTY || prev == key) return int(2u * bucket);
        prev = atomicCompSwap(htab[bucket].z, HASH_EMPTY, key);
        if (prev == HASH_EMPTY || prev == key) return int(2u * bucket + 1u);
        bucket = (bucket + 1u) & mask;
    }
    return -1;
}

// Value stored with `key`, or -1 when it is not in the table.
int hash_find(int key, uint mask)
{
    uint bucket = sparse_hash(key) & mask;
    for (uint probe = 0u; probe <= mask; ++probe) {
        ivec4 b = htab[bucket];
        if (b.x == key) return b.y;
        if (b.z == key) return b.w;
        if (b.x == HASH_EMPTY || b.z == HASH_EMPTY) return -1;
        bucket = (bucket + 1u) & mask;
    }
    return -1;
}

#endif
