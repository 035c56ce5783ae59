#!/usr/bin/env python3
"""Writes the seed corpus of the heap_ops fuzz target (fuzz/corpus/heap_ops/seed-*).

Each seed is a thread-count byte and 4-byte operations (see tests/common/fuzz_ops.rs). The seeds cover
every operation and size scale, one to three threads, cross-thread frees through the pool,
alignments up to 64 KiB, huge blocks and realloc across the small/large/huge boundaries."""
import os
import random
import struct

OUT = os.path.join(os.path.dirname(__file__), "..", "fuzz", "corpus", "heap_ops")


def op(tag, scale=0, a=0, b=0, c=0):
    return bytes([(tag & 7) | (scale << 3), a & 255, b & 255, c & 255])


def alloc(size, scale, align_exp=4):
    return op(0, scale, size & 255, size >> 8, align_exp)


def seeds():
    yield "seed-basic", bytes([0]) + b"".join(
        [alloc(24, 0), alloc(200, 0), op(1, 0, 0), alloc(5000, 1), op(1, 0, 1), op(1, 0, 0)])
    yield "seed-calloc", bytes([0]) + b"".join(op(3, s, 100, 3) for s in range(4)) + op(1, 0, 2)
    yield "seed-realloc-grow", bytes([0]) + alloc(8, 0) + b"".join(
        op(2, s, 0, 0xff, 0x7f) for s in range(4)) + op(2, 0, 0, 3, 0)
    yield "seed-align", bytes([0]) + b"".join(alloc(100, 1, e) for e in range(17))
    yield "seed-usable", bytes([0]) + b"".join(
        [alloc(33, 0), op(6, 0, 0), alloc(9000, 2), op(6, 0, 1), op(1, 0, 0)])
    yield "seed-huge", bytes([0]) + b"".join(
        [alloc(0xffff, 3), op(2, 3, 0, 0, 0x90), op(2, 1, 0, 0x10, 0x10), op(1, 0, 0)])
    yield "seed-pool-2threads", bytes([1]) + b"".join(
        [alloc(64, 0), alloc(64, 0), op(4, 0, 0), op(5, 0, 0)] * 20)
    yield "seed-pool-3threads", bytes([2]) + b"".join(
        [alloc(i * 37, i % 3), op(4, 0, i), op(5, 0, i)][i % 3] for i in range(300))
    rng = random.Random(7)
    for n in range(6):
        ops = b"".join(
            op(rng.choice([0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7]), rng.choice([0, 0, 1, 1, 2, 3]),
               rng.randrange(256), rng.randrange(256), rng.randrange(256))
            for _ in range(rng.randrange(50, 600)))
        yield f"seed-random-{n}", bytes([n % 3]) + ops


os.makedirs(OUT, exist_ok=True)
for name, data in seeds():
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)
print("wrote", len(list(seeds())), "seeds to", os.path.normpath(OUT))
