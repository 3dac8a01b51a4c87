/* beluga._native: the store's read path in C (optional; beluga/readpath.py
 * has the same functions in Python, with identical results, and is what the
 * guests use). Built by `make setup` (python -m beluga.native_build).
 *
 *   crc32(data, value=0) -> int          CRC-32 (zlib polynomial), as zlib.crc32
 *   probe(buf, table_off, buckets, tseq_off, key) -> (gen, where, length, crc) | None | False
 *   probe_prefix(buf, table_off, buckets, tseq_off, keys, ring_off, head_off, head) -> (hits, head, busy)
 *   copy_crc(dest, src, stream=False) -> CRC-32 of the bytes copied (one pass; stream: non-temporal stores)
 *   read_into(buf, dest, header_off, data_off, key, gen, length, crc) -> int status
 *   read_bytes(buf, header_off, data_off, key, gen, length, crc) -> bytes | int status
 *   Reader(buf, geometry...): get / get_into / probe / lookup_prefix / post_touches in one call each
 *   writeback/invalidate/fence: cache-line flushes for non-coherent pools (section before the table)
 *
 * Record formats are those of beluga/layout.py (TABLE_BUCKET, BLOCK_HEADER);
 * the seqlock and verification order is that of readpath.py, which documents it.
 * Memory ordering: x86 TSO keeps loads in program order; the compiler barriers
 * below keep the compiler from reordering them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#define BARRIER() __atomic_signal_fence(__ATOMIC_SEQ_CST)

#define KEY_BYTES 32
#define BUCKET_BYTES 64
#define HEADER_BYTES 128
#define BLOCK_MAGIC 0x484B4C42u
#define LAYOUT_VERSION 2
#define BLOCK_COMPLETE 2
#define BUCKET_SPINS 1000
#define TABLE_RETRIES 8
#define TOUCH_RING_ENTRIES 2048

enum { READ_OK = 0, READ_HEADER = 1, READ_CRC = 2, READ_MOVED = 3 };

/* The cache-line flushes (defined in their section below), for a Reader whose pool flushes
 * (docs/coherence.md): it invalidates what it reads and writes back the touches it posts. */
static int flush_kind, inval_kind;
static void flush_lines(int kind, const uint8_t *start, size_t n);
static void fence_for(int kind);
static void inval_lines(const uint8_t *p, size_t n);

/* ------------------------------------------------------------ CRC-32 */
static uint32_t crc_table[8][256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
        crc_table[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (uint32_t i = 0; i < 256; i++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}

/* State in, state out (the register, not inverted); eight bytes per step (slicing by 8):
 * records (buckets, headers) and the tails the folding leaves. */
static uint32_t crc_bytes(uint32_t c, const uint8_t *p, size_t n) {
    while (n >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= c;
        c = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^ crc_table[5][(lo >> 16) & 0xFF]
            ^ crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF]
            ^ crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = crc_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

#ifdef HAVE_X86
static int have_clmul;

/* Folding with carry-less multiplication (Intel, "Fast CRC computation for generic
 * polynomials using PCLMULQDQ", 2009), for the bit-reflected CRC-32 polynomial.
 * Constants are x^k mod P(x) for the fold distances, and the Barrett pair. */
__attribute__((target("pclmul,sse4.1")))
static inline __m128i fold(__m128i x, __m128i k) {
    return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
}

/* Four 128-bit accumulators (64 consecutive bytes) -> one, the rest in 16-byte steps, then
 * reduction to 32 bits. */
__attribute__((target("pclmul,sse4.1")))
static inline uint32_t crc_tail(__m128i a, __m128i b, __m128i d, __m128i e, const uint8_t *src, uint8_t *dst,
                                size_t left, size_t n, size_t *done) {
    const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL);
    const __m128i k5 = _mm_set_epi64x(0, 0x0163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x01f7011641LL, 0x01db710641LL);
    const __m128i low32 = _mm_setr_epi32(-1, 0, -1, 0);
    a = _mm_xor_si128(fold(a, k3k4), b);
    a = _mm_xor_si128(fold(a, k3k4), d);
    a = _mm_xor_si128(fold(a, k3k4), e);
    while (left >= 16) {
        __m128i l0 = _mm_loadu_si128((const __m128i *)src);
        if (dst) {
            _mm_storeu_si128((__m128i *)dst, l0);
            dst += 16;
        }
        a = _mm_xor_si128(fold(a, k3k4), l0);
        src += 16;
        left -= 16;
    }
    /* 128 -> 64 bits */
    __m128i t = _mm_clmulepi64_si128(a, k3k4, 0x10);
    a = _mm_xor_si128(_mm_srli_si128(a, 8), t);
    /* 64 -> 32 bits */
    t = _mm_srli_si128(a, 4);
    a = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(a, low32), k5, 0x00), t);
    /* Barrett reduction */
    t = _mm_clmulepi64_si128(_mm_and_si128(a, low32), poly, 0x10);
    t = _mm_clmulepi64_si128(_mm_and_si128(t, low32), poly, 0x00);
    a = _mm_xor_si128(a, t);
    *done = n - left;
    return (uint32_t)_mm_extract_epi32(a, 1);
}

/* CRC of n >= 64 bytes at src; if dst is not NULL the bytes are also copied there
 * (one pass: each 16 bytes are loaded once, stored and folded). Returns the state
 * after floor(n/16)*16 bytes; *done says how many. nt (only with a 64-byte aligned
 * dst): the main loop's stores are non-temporal; the caller fences. */
__attribute__((target("pclmul,sse4.1")))
static uint32_t crc_fold(uint32_t c, const uint8_t *src, uint8_t *dst, size_t n, size_t *done, int nt) {
    const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL);
    size_t left = n;
    __m128i a = _mm_loadu_si128((const __m128i *)src);
    __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
    __m128i d = _mm_loadu_si128((const __m128i *)(src + 32));
    __m128i e = _mm_loadu_si128((const __m128i *)(src + 48));
    if (dst) {
        _mm_storeu_si128((__m128i *)dst, a);
        _mm_storeu_si128((__m128i *)(dst + 16), b);
        _mm_storeu_si128((__m128i *)(dst + 32), d);
        _mm_storeu_si128((__m128i *)(dst + 48), e);
        dst += 64;
    }
    a = _mm_xor_si128(a, _mm_cvtsi32_si128((int)c));
    src += 64;
    left -= 64;
    while (left >= 64) {
        __m128i l0 = _mm_loadu_si128((const __m128i *)src);
        __m128i l1 = _mm_loadu_si128((const __m128i *)(src + 16));
        __m128i l2 = _mm_loadu_si128((const __m128i *)(src + 32));
        __m128i l3 = _mm_loadu_si128((const __m128i *)(src + 48));
        if (nt) {
            _mm_stream_si128((__m128i *)dst, l0);
            _mm_stream_si128((__m128i *)(dst + 16), l1);
            _mm_stream_si128((__m128i *)(dst + 32), l2);
            _mm_stream_si128((__m128i *)(dst + 48), l3);
            dst += 64;
        } else if (dst) {
            _mm_storeu_si128((__m128i *)dst, l0);
            _mm_storeu_si128((__m128i *)(dst + 16), l1);
            _mm_storeu_si128((__m128i *)(dst + 32), l2);
            _mm_storeu_si128((__m128i *)(dst + 48), l3);
            dst += 64;
        }
        a = _mm_xor_si128(fold(a, k1k2), l0);
        b = _mm_xor_si128(fold(b, k1k2), l1);
        d = _mm_xor_si128(fold(d, k1k2), l2);
        e = _mm_xor_si128(fold(e, k1k2), l3);
        src += 64;
        left -= 64;
    }
    return crc_tail(a, b, d, e, src, dst, left, n, done);
}

static int have_avx512;

/* The same folding, 256 bytes per step in four 512-bit registers (each four 128-bit
 * lanes): lanes are folded across 2048 bits, then the registers into one across 512
 * bits, which leaves the four 128-bit accumulators crc_tail expects. n >= 256; nt as
 * in crc_fold. */
__attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.1")))
static uint32_t crc_fold512(uint32_t c, const uint8_t *src, uint8_t *dst, size_t n, size_t *done, int nt) {
    const __m512i k2048 = _mm512_broadcast_i32x4(_mm_set_epi64x(0x01322d1430LL, 0x011542778aLL));
    const __m512i k512 = _mm512_broadcast_i32x4(_mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL));
    size_t left = n;
    __m512i z0 = _mm512_loadu_si512((const void *)src);
    __m512i z1 = _mm512_loadu_si512((const void *)(src + 64));
    __m512i z2 = _mm512_loadu_si512((const void *)(src + 128));
    __m512i z3 = _mm512_loadu_si512((const void *)(src + 192));
    if (dst) {
        _mm512_storeu_si512((void *)dst, z0);
        _mm512_storeu_si512((void *)(dst + 64), z1);
        _mm512_storeu_si512((void *)(dst + 128), z2);
        _mm512_storeu_si512((void *)(dst + 192), z3);
        dst += 256;
    }
    z0 = _mm512_xor_si512(z0, _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)c)));
    src += 256;
    left -= 256;
#define FOLD512(z, k) _mm512_xor_si512(_mm512_clmulepi64_epi128(z, k, 0x00), _mm512_clmulepi64_epi128(z, k, 0x11))
    while (left >= 256) {
        __m512i l0 = _mm512_loadu_si512((const void *)src);
        __m512i l1 = _mm512_loadu_si512((const void *)(src + 64));
        __m512i l2 = _mm512_loadu_si512((const void *)(src + 128));
        __m512i l3 = _mm512_loadu_si512((const void *)(src + 192));
        if (nt) {
            _mm512_stream_si512((void *)dst, l0);
            _mm512_stream_si512((void *)(dst + 64), l1);
            _mm512_stream_si512((void *)(dst + 128), l2);
            _mm512_stream_si512((void *)(dst + 192), l3);
            dst += 256;
        } else if (dst) {
            _mm512_storeu_si512((void *)dst, l0);
            _mm512_storeu_si512((void *)(dst + 64), l1);
            _mm512_storeu_si512((void *)(dst + 128), l2);
            _mm512_storeu_si512((void *)(dst + 192), l3);
            dst += 256;
        }
        z0 = _mm512_xor_si512(FOLD512(z0, k2048), l0);
        z1 = _mm512_xor_si512(FOLD512(z1, k2048), l1);
        z2 = _mm512_xor_si512(FOLD512(z2, k2048), l2);
        z3 = _mm512_xor_si512(FOLD512(z3, k2048), l3);
        src += 256;
        left -= 256;
    }
    z1 = _mm512_xor_si512(FOLD512(z0, k512), z1);
    z2 = _mm512_xor_si512(FOLD512(z1, k512), z2);
    z3 = _mm512_xor_si512(FOLD512(z2, k512), z3);
    while (left >= 64) {
        __m512i l0 = _mm512_loadu_si512((const void *)src);
        if (dst) {
            _mm512_storeu_si512((void *)dst, l0);
            dst += 64;
        }
        z3 = _mm512_xor_si512(FOLD512(z3, k512), l0);
        src += 64;
        left -= 64;
    }
#undef FOLD512
    return crc_tail(_mm512_extracti32x4_epi32(z3, 0), _mm512_extracti32x4_epi32(z3, 1),
                    _mm512_extracti32x4_epi32(z3, 2), _mm512_extracti32x4_epi32(z3, 3), src, dst, left, n, done);
}
#endif

/* zlib-compatible: crc32(value, data) with pre/post inversion. Copies into dst when given;
 * with stream, and dst 64-byte aligned, the bulk of the copy uses non-temporal stores (a put
 * into the pool: the writer never reads the block back, so it goes to memory without first
 * reading each line in) and ends with an sfence, so the data is ordered before later stores. */
static uint32_t crc_copy_stream(uint32_t value, const uint8_t *src, uint8_t *dst, size_t n, int stream) {
    uint32_t c = ~value;
    size_t done = 0;
#ifdef HAVE_X86
    int nt = stream && dst && ((uintptr_t)dst & 63) == 0;
    if (have_avx512 && n >= 256)
        c = crc_fold512(c, src, dst, n, &done, nt);
    else if (have_clmul && n >= 64)
        c = crc_fold(c, src, dst, n, &done, nt);
    if (nt)
        _mm_sfence();
#else
    (void)stream;
#endif
    if (dst) {
        /* the CRC is always of the copy: what the caller got, whatever src does meanwhile */
        memcpy(dst + done, src + done, n - done);
        c = crc_bytes(c, dst + done, n - done);
    } else {
        c = crc_bytes(c, src + done, n - done);
    }
    return ~c;
}
static uint32_t crc_copy(uint32_t value, const uint8_t *src, uint8_t *dst, size_t n) {
    return crc_copy_stream(value, src, dst, n, 0);
}

/* ------------------------------------------------------------ records */
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32v(const uint8_t *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE); }
static inline uint64_t ld64v(const uint8_t *p) { return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE); }

/* layout.block_header_matches */
static int header_matches(const uint8_t *h, const uint8_t *key, uint64_t gen, uint64_t length, uint32_t dcrc) {
    return ld32(h) == BLOCK_MAGIC && ld16(h + 4) == LAYOUT_VERSION && ld16(h + 6) == BLOCK_COMPLETE
        && ld64(h + 8) == length && ld64(h + 16) == gen && ld32(h + 24) == dcrc
        && memcmp(h + 32, key, KEY_BYTES) == 0
        && ld32(h + HEADER_BYTES - 4) == crc_copy(0, h, NULL, HEADER_BYTES - 4);
}

/* ------------------------------------------------------------ Python functions */
static PyObject *py_crc32(PyObject *self, PyObject *args) {
    Py_buffer data;
    unsigned long value = 0;
    if (!PyArg_ParseTuple(args, "y*|k", &data, &value))
        return NULL;
    uint32_t c;
    Py_BEGIN_ALLOW_THREADS
    c = crc_copy((uint32_t)value, data.buf, NULL, (size_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(c);
}

/* The table probe of readpath.py: 1 hit (fields in out[4]), 0 miss, -1 busy. */
static int probe_one(const uint8_t *base, uint64_t table_off, uint64_t buckets, uint64_t tseq_off,
                     const uint8_t *key, uint64_t out[4], int fl) {
    uint64_t home = ld64(key) % buckets;
    for (int attempt = 0; attempt < TABLE_RETRIES; attempt++) {
        if (fl)
            inval_lines(base + tseq_off, 8);
        uint64_t s = ld64v(base + tseq_off);
        BARRIER();
        if (s & 1)
            return -1; /* the service is rebuilding the table */
        uint64_t i = home;
        int moved = 0;
        for (uint64_t n = 0; n < buckets; n++, i = (i + 1 == buckets ? 0 : i + 1)) {
            const uint8_t *b = base + table_off + i * BUCKET_BYTES;
            uint8_t raw[BUCKET_BYTES];
            int spins = 0;
            for (;;) {
                if (fl)
                    inval_lines(b, BUCKET_BYTES);
                uint32_t s1 = ld32v(b);
                BARRIER();
                memcpy(raw, b, BUCKET_BYTES);
                BARRIER();
                uint32_t s2 = ld32v(b);
                if (!(s1 & 1) && s1 == s2) {
                    uint64_t gen = ld64(raw + 40);
                    if (gen == 0 || ld32(raw + 4) == crc_copy(0, raw + 8, NULL, BUCKET_BYTES - 8))
                        break;
                }
                if (++spins >= BUCKET_SPINS)
                    return -1;
            }
            uint64_t gen = ld64(raw + 40);
            if (gen == 0) {
                BARRIER();
                if (fl)
                    inval_lines(base + tseq_off, 8);
                if (ld64v(base + tseq_off) == s)
                    return 0;
                moved = 1; /* an entry may have moved past us: probe again */
                break;
            }
            if (memcmp(raw + 8, key, KEY_BYTES) == 0) {
                out[0] = gen;
                out[1] = ld64(raw + 48);
                out[2] = ld32(raw + 56);
                out[3] = ld32(raw + 60);
                return 1;
            }
        }
        if (!moved)
            return -1; /* no empty bucket at all: not a table a service wrote */
    }
    return -1;
}

static int check_table(size_t size, unsigned long long table_off, unsigned long long buckets,
                       unsigned long long tseq_off) {
    if (buckets < 1 || buckets > size / BUCKET_BYTES || tseq_off + 8 > size || table_off > size
        || table_off + buckets * BUCKET_BYTES > size) {
        PyErr_SetString(PyExc_ValueError, "probe: key or table outside the pool");
        return 0;
    }
    return 1;
}

static PyObject *py_probe(PyObject *self, PyObject *args) {
    Py_buffer pool;
    unsigned long long table_off, buckets, tseq_off;
    const char *key;
    Py_ssize_t keylen;
    if (!PyArg_ParseTuple(args, "y*KKKy#", &pool, &table_off, &buckets, &tseq_off, &key, &keylen))
        return NULL;
    PyObject *result = NULL;
    if (keylen != KEY_BYTES) {
        PyErr_SetString(PyExc_ValueError, "probe: key or table outside the pool");
    } else if (check_table((size_t)pool.len, table_off, buckets, tseq_off)) {
        uint64_t f[4];
        int r = probe_one(pool.buf, table_off, buckets, tseq_off, (const uint8_t *)key, f, 0);
        if (r > 0)
            result = Py_BuildValue("(KKkk)", (unsigned long long)f[0], (unsigned long long)f[1],
                                   (unsigned long)f[2], (unsigned long)f[3]);
        else {
            result = r == 0 ? Py_None : Py_False;
            Py_INCREF(result);
        }
    }
    PyBuffer_Release(&pool);
    return result;
}

/* readpath.py_probe_prefix: leading hits of a key list, each posted as a touch (layout.post_touch). */
static PyObject *py_probe_prefix(PyObject *self, PyObject *args) {
    Py_buffer pool;
    unsigned long long table_off, buckets, tseq_off, ring_off, head_off, head;
    PyObject *keys;
    if (!PyArg_ParseTuple(args, "y*KKKOKKK", &pool, &table_off, &buckets, &tseq_off, &keys, &ring_off, &head_off,
                          &head))
        return NULL;
    PyObject *result = NULL;
    PyObject *seq = PySequence_Fast(keys, "probe_prefix: keys must be a sequence");
    if (!seq)
        goto out;
    size_t size = (size_t)pool.len;
    if (!check_table(size, table_off, buckets, tseq_off))
        goto out;
    if (ring_off > size || ring_off + TOUCH_RING_ENTRIES * 8 > size || head_off + 8 > size) {
        PyErr_SetString(PyExc_ValueError, "probe_prefix: touch ring outside the pool");
        goto out;
    }
    Py_ssize_t nkeys = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t j = 0; j < nkeys; j++) {
        if (!PyBytes_Check(items[j]) || PyBytes_GET_SIZE(items[j]) != KEY_BYTES) {
            PyErr_SetString(PyExc_ValueError, "probe_prefix: every key must be 32 bytes");
            goto out;
        }
    }
    uint8_t *base = pool.buf;
    Py_ssize_t n = 0;
    int busy = 0;
    uint64_t h = head;
    for (; n < nkeys; n++) {
        uint64_t f[4];
        int r = probe_one(base, table_off, buckets, tseq_off, (const uint8_t *)PyBytes_AS_STRING(items[n]), f, 0);
        if (r <= 0) {
            busy = r < 0;
            break;
        }
        uint32_t entry[2] = {(uint32_t)f[1], (uint32_t)f[0]};
        memcpy(base + ring_off + (h % TOUCH_RING_ENTRIES) * 8, entry, 8);
        h++;
    }
    if (h != head) {
        BARRIER(); /* entries first, then the head (the service reads the head first) */
        __atomic_store_n((uint64_t *)(base + head_off), h, __ATOMIC_RELEASE);
    }
    result = Py_BuildValue("(nKO)", n, (unsigned long long)h, busy ? Py_True : Py_False);
out:
    Py_XDECREF(seq);
    PyBuffer_Release(&pool);
    return result;
}

/* Copy src into dest and return the CRC-32 of what was copied (one pass): a put's data
 * (stream: with non-temporal stores, see crc_copy_stream). */
static PyObject *py_copy_crc(PyObject *self, PyObject *args) {
    Py_buffer dest, src;
    int stream = 0;
    if (!PyArg_ParseTuple(args, "w*y*|p", &dest, &src, &stream))
        return NULL;
    PyObject *result = NULL;
    if (dest.len != src.len) {
        PyErr_SetString(PyExc_ValueError, "copy_crc: destination and source differ in length");
    } else {
        uint32_t c;
        Py_BEGIN_ALLOW_THREADS
        c = crc_copy_stream(0, src.buf, dest.buf, (size_t)src.len, stream);
        Py_END_ALLOW_THREADS
        result = PyLong_FromUnsignedLong(c);
    }
    PyBuffer_Release(&dest);
    PyBuffer_Release(&src);
    return result;
}

/* Shared part of read_into/read_bytes: header, copy with CRC, CRC, header again. */
static int read_block(const uint8_t *base, uint8_t *dst, uint64_t hoff, uint64_t doff, const uint8_t *key,
                      uint64_t gen, uint64_t length, uint32_t dcrc, int fl) {
    uint8_t h1[HEADER_BYTES];
    if (fl)
        inval_lines(base + hoff, HEADER_BYTES);
    memcpy(h1, base + hoff, HEADER_BYTES);
    BARRIER();
    if (!header_matches(h1, key, gen, length, dcrc))
        return READ_HEADER;
    if (fl)
        inval_lines(base + doff, (size_t)length);
    uint32_t c = crc_copy(0, base + doff, dst, (size_t)length);
    if (c != dcrc)
        return READ_CRC;
    BARRIER();
    if (fl)
        inval_lines(base + hoff, HEADER_BYTES);
    if (memcmp(h1, base + hoff, HEADER_BYTES) != 0)
        return READ_MOVED;
    return READ_OK;
}

static int check_span(size_t size, unsigned long long hoff, unsigned long long doff, unsigned long long length) {
    if (hoff + HEADER_BYTES > size || hoff + HEADER_BYTES < hoff || doff + length > size || doff + length < doff) {
        PyErr_SetString(PyExc_ValueError, "read: block outside the pool");
        return 0;
    }
    return 1;
}

static PyObject *py_read_into(PyObject *self, PyObject *args) {
    Py_buffer pool, dest;
    unsigned long long hoff, doff, gen, length;
    unsigned long dcrc;
    const char *key;
    Py_ssize_t keylen;
    if (!PyArg_ParseTuple(args, "y*w*KKy#KKk", &pool, &dest, &hoff, &doff, &key, &keylen, &gen, &length, &dcrc))
        return NULL;
    PyObject *result = NULL;
    if (keylen != KEY_BYTES) {
        PyErr_SetString(PyExc_ValueError, "read_into: key must be 32 bytes");
    } else if (length > (unsigned long long)dest.len) {
        PyErr_SetString(PyExc_ValueError, "read_into: destination smaller than the block");
    } else if (check_span((size_t)pool.len, hoff, doff, length)) {
        int st;
        Py_BEGIN_ALLOW_THREADS
        st = read_block(pool.buf, dest.buf, hoff, doff, (const uint8_t *)key, gen, length, (uint32_t)dcrc, 0);
        Py_END_ALLOW_THREADS
        result = PyLong_FromLong(st);
    }
    PyBuffer_Release(&pool);
    PyBuffer_Release(&dest);
    return result;
}

static PyObject *py_read_bytes(PyObject *self, PyObject *args) {
    Py_buffer pool;
    unsigned long long hoff, doff, gen, length;
    unsigned long dcrc;
    const char *key;
    Py_ssize_t keylen;
    if (!PyArg_ParseTuple(args, "y*KKy#KKk", &pool, &hoff, &doff, &key, &keylen, &gen, &length, &dcrc))
        return NULL;
    PyObject *result = NULL;
    if (keylen != KEY_BYTES) {
        PyErr_SetString(PyExc_ValueError, "read_bytes: key must be 32 bytes");
    } else if (check_span((size_t)pool.len, hoff, doff, length)) {
        result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)length);
        if (result) {
            int st;
            uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(result);
            Py_BEGIN_ALLOW_THREADS
            st = read_block(pool.buf, dst, hoff, doff, (const uint8_t *)key, gen, length, (uint32_t)dcrc, 0);
            Py_END_ALLOW_THREADS
            if (st != READ_OK) {
                Py_DECREF(result);
                result = PyLong_FromLong(st);
            }
        }
    }
    PyBuffer_Release(&pool);
    return result;
}

/* ------------------------------------------------------------ Reader: a whole get in one call */
/* readpath.PyReader in C (same methods, same answers): the pool's buffer and geometry are taken
 * once, so a get is one call that checks the key, probes the table, checks the header, copies
 * with CRC, compares, re-checks the header and posts the touch. The touch head lives in the
 * pool (its client is its one writer); posting reads and moves it while this process holds
 * the GIL, so threads of one client never interleave their posts. */
#define GIL_RELEASE_BYTES (64 * 1024)
#define WHERE_SLOT_BITS 40
#define READ_ATTEMPTS 4

typedef struct {
    PyObject_HEAD
    Py_buffer pool;
    uint64_t table_off, buckets, tseq_off;
    uint64_t gran, max_slots, seg_count, seg_size, headers_off, segments_off;
    uint64_t ring_off, head_off;
    int have_ring;
    int flush; /* the pool's flush policy is on: invalidate what it reads, write back what it posts */
    unsigned long long gets, hits, misses, get_bytes;
} ReaderObject;

static void reader_dealloc(ReaderObject *r) {
    if (r->pool.obj)
        PyBuffer_Release(&r->pool);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static int reader_init(ReaderObject *r, PyObject *args, PyObject *kw) {
    unsigned long long t, b, q, g, ms, sc, ss, ho, so;
    Py_buffer pool;
    if (!PyArg_ParseTuple(args, "w*KKKKKKKKK", &pool, &t, &b, &q, &g, &ms, &sc, &ss, &ho, &so))
        return -1;
    if (r->pool.obj)
        PyBuffer_Release(&r->pool);
    r->pool = pool;
    if (!check_table((size_t)pool.len, t, b, q))
        return -1;
    if (g == 0 || ms == 0 || ho > (size_t)pool.len || so > (size_t)pool.len) {
        PyErr_SetString(PyExc_ValueError, "Reader: geometry outside the pool");
        return -1;
    }
    r->table_off = t, r->buckets = b, r->tseq_off = q, r->gran = g, r->max_slots = ms, r->seg_count = sc;
    r->seg_size = ss, r->headers_off = ho, r->segments_off = so;
    r->have_ring = 0;
    r->flush = 0;
    return 0;
}

/* layout.unpack_where, and the block inside the pool: header and data offsets, or 0. */
static int reader_place(ReaderObject *r, uint64_t where, uint64_t length, uint64_t *hoff, uint64_t *doff) {
    uint64_t gslot = where & ((1ULL << WHERE_SLOT_BITS) - 1);
    uint64_t seg = gslot / r->max_slots, slot = gslot % r->max_slots, dslot, end, size = (uint64_t)r->pool.len;
    if (__builtin_mul_overflow(where >> WHERE_SLOT_BITS, r->gran, &dslot) || seg >= r->seg_count || dslot == 0
        || __builtin_mul_overflow(slot + 1, dslot, &end) || end > r->seg_size || length > dslot)
        return 0;
    *hoff = r->headers_off + gslot * HEADER_BYTES;
    *doff = r->segments_off + seg * r->seg_size + slot * dslot;
    return *hoff + HEADER_BYTES <= size && *doff + length <= size;
}

static inline void reader_post(ReaderObject *r, uint64_t where, uint64_t gen) {
    if (!r->have_ring)
        return;
    uint8_t *base = r->pool.buf;
    uint64_t h = ld64v(base + r->head_off);
    uint32_t entry[2] = {(uint32_t)where, (uint32_t)gen};
    uint8_t *e = base + r->ring_off + (h % TOUCH_RING_ENTRIES) * 8;
    memcpy(e, entry, 8);
    if (r->flush) {
        flush_lines(flush_kind, e, 8);
        fence_for(flush_kind);
    }
    BARRIER(); /* entries first, then the head (the service reads the head first) */
    __atomic_store_n((uint64_t *)(base + r->head_off), h + 1, __ATOMIC_RELEASE);
    if (r->flush) {
        flush_lines(flush_kind, base + r->head_off, 8);
        fence_for(flush_kind);
    }
}

static int reader_key(PyObject *key) {
    if (!PyBytes_CheckExact(key) || PyBytes_GET_SIZE(key) != KEY_BYTES) {
        PyErr_SetString(PyExc_ValueError, "Reader: key must be 32 bytes");
        return 0;
    }
    return 1;
}

/* get (dest NULL: a new bytes object) and get_into: -> bytes / length, None (miss, counted),
 * False (ask the service) or (READ_* status, generation) of a block that failed verification. */
static PyObject *reader_read(ReaderObject *r, PyObject *key, Py_buffer *dest) {
    if (!reader_key(key))
        return NULL;
    const uint8_t *k = (const uint8_t *)PyBytes_AS_STRING(key);
    uint8_t *base = r->pool.buf;
    uint64_t f[4], prev[4];
    int have_prev = 0, st = READ_OK;
    PyObject *out = NULL;
    for (int attempt = 0; attempt < READ_ATTEMPTS; attempt++) {
        int found = probe_one(base, r->table_off, r->buckets, r->tseq_off, k, f, r->flush);
        if (found <= 0) {
            Py_XDECREF(out);
            if (found < 0)
                Py_RETURN_FALSE;
            r->gets++;
            r->misses++;
            Py_RETURN_NONE;
        }
        if (have_prev && memcmp(f, prev, sizeof f) == 0)
            break; /* same entry, same failure: the committed bytes themselves are bad */
        memcpy(prev, f, sizeof f);
        have_prev = 1;
        uint64_t hoff, doff, length = f[2];
        if (!reader_place(r, f[1], length, &hoff, &doff)) {
            Py_XDECREF(out);
            Py_RETURN_FALSE; /* not an entry this pool could have: let the service answer */
        }
        /* Start the header's and the first pages' misses together (a page boundary stops the
         * hardware prefetcher; the header check would otherwise wait for its line alone). */
        __builtin_prefetch(base + hoff);
        __builtin_prefetch(base + hoff + 64);
        for (uint64_t o = 0; o < length && o < GIL_RELEASE_BYTES; o += 4096)
            __builtin_prefetch(base + doff + o);
        uint8_t *dst;
        if (dest) {
            if (length > (uint64_t)dest->len) {
                PyObject *hex = PyObject_CallMethod(key, "hex", NULL);
                if (hex)
                    PyErr_Format(PyExc_ValueError, "block for key %.16U... has %llu bytes, the destination only %zd",
                                 hex, (unsigned long long)length, dest->len);
                Py_XDECREF(hex);
                return NULL;
            }
            dst = dest->buf;
        } else {
            if (!out || (uint64_t)PyBytes_GET_SIZE(out) != length) {
                Py_XDECREF(out);
                out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)length);
                if (!out)
                    return NULL;
            }
            dst = (uint8_t *)PyBytes_AS_STRING(out);
        }
        if (length >= GIL_RELEASE_BYTES) {
            Py_BEGIN_ALLOW_THREADS
            st = read_block(base, dst, hoff, doff, k, f[0], length, (uint32_t)f[3], r->flush);
            Py_END_ALLOW_THREADS
        } else {
            st = read_block(base, dst, hoff, doff, k, f[0], length, (uint32_t)f[3], r->flush);
        }
        if (st == READ_OK) {
            reader_post(r, f[1], f[0]);
            r->gets++;
            r->hits++;
            r->get_bytes += length;
            return dest ? PyLong_FromUnsignedLongLong(length) : out;
        }
    }
    Py_XDECREF(out);
    return Py_BuildValue("(iK)", st, (unsigned long long)prev[0]);
}

static PyObject *reader_get(ReaderObject *r, PyObject *key) { return reader_read(r, key, NULL); }

static PyObject *reader_get_into(ReaderObject *r, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "get_into(key, dest)");
        return NULL;
    }
    Py_buffer dest;
    if (PyObject_GetBuffer(args[1], &dest, PyBUF_WRITABLE) < 0)
        return NULL;
    PyObject *res = reader_read(r, args[0], &dest);
    PyBuffer_Release(&dest);
    return res;
}

static PyObject *reader_probe(ReaderObject *r, PyObject *key) {
    if (!reader_key(key))
        return NULL;
    uint64_t f[4];
    int found = probe_one(r->pool.buf, r->table_off, r->buckets, r->tseq_off, (const uint8_t *)PyBytes_AS_STRING(key), f, r->flush);
    if (found > 0)
        return Py_BuildValue("(KKkk)", (unsigned long long)f[0], (unsigned long long)f[1], (unsigned long)f[2],
                             (unsigned long)f[3]);
    if (found == 0)
        Py_RETURN_NONE;
    Py_RETURN_FALSE;
}

/* Leading hits of a key list, each posted as a touch: -> (hits, busy). */
static PyObject *reader_lookup_prefix(ReaderObject *r, PyObject *keys) {
    PyObject *seq = PySequence_Fast(keys, "lookup_prefix: keys must be a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t nkeys = PySequence_Fast_GET_SIZE(seq), n = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t j = 0; j < nkeys; j++) {
        if (!reader_key(items[j])) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    int busy = 0;
    for (; n < nkeys; n++) {
        uint64_t f[4];
        int found = probe_one(r->pool.buf, r->table_off, r->buckets, r->tseq_off,
                              (const uint8_t *)PyBytes_AS_STRING(items[n]), f, r->flush);
        if (found <= 0) {
            busy = found < 0;
            break;
        }
        reader_post(r, f[1], f[0]);
    }
    Py_DECREF(seq);
    return Py_BuildValue("(nO)", n, busy ? Py_True : Py_False);
}

static PyObject *reader_post_touches(ReaderObject *r, PyObject *touches) {
    PyObject *seq = PySequence_Fast(touches, "post_touches: a sequence of (where, generation)");
    if (!seq)
        return NULL;
    for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(seq); j++) {
        unsigned long long where, gen;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, j), "KK", &where, &gen)) {
            Py_DECREF(seq);
            return NULL;
        }
        reader_post(r, where, gen);
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyObject *reader_set_ring(ReaderObject *r, PyObject *args) {
    PyObject *ring = Py_None;
    unsigned long long head_off = 0;
    if (!PyArg_ParseTuple(args, "|OK", &ring, &head_off))
        return NULL;
    if (ring == Py_None) {
        r->have_ring = 0;
        Py_RETURN_NONE;
    }
    unsigned long long ring_off = PyLong_AsUnsignedLongLong(ring);
    if (PyErr_Occurred())
        return NULL;
    size_t size = (size_t)r->pool.len;
    if (ring_off > size || ring_off + TOUCH_RING_ENTRIES * 8 > size || head_off + 8 > size || head_off % 8) {
        PyErr_SetString(PyExc_ValueError, "set_ring: touch ring outside the pool");
        return NULL;
    }
    r->ring_off = ring_off, r->head_off = head_off, r->have_ring = 1;
    Py_RETURN_NONE;
}

static PyObject *reader_counts(ReaderObject *r, PyObject *unused) {
    return Py_BuildValue("{sKsKsKsK}", "gets", r->gets, "hits", r->hits, "misses", r->misses, "get_bytes", r->get_bytes);
}

static PyObject *reader_set_flush(ReaderObject *r, PyObject *on) {
    int v = PyObject_IsTrue(on);
    if (v < 0)
        return NULL;
    r->flush = v;
    Py_RETURN_NONE;
}

static PyMethodDef reader_methods[] = {
    {"set_flush", (PyCFunction)reader_set_flush, METH_O,
     "set_flush(on): invalidate what it reads and write back the touches it posts (a pool whose flush policy is on)"},
    {"get", (PyCFunction)reader_get, METH_O, "get(key) -> bytes, None (miss), False (ask the service) or (status, generation)"},
    {"get_into", (PyCFunction)(void (*)(void))reader_get_into, METH_FASTCALL,
     "get_into(key, dest) -> length, None, False or (status, generation)"},
    {"probe", (PyCFunction)reader_probe, METH_O, "probe(key) -> (generation, where, length, crc), None or False"},
    {"lookup_prefix", (PyCFunction)reader_lookup_prefix, METH_O, "lookup_prefix(keys) -> (hits, busy); hits are touched"},
    {"post_touches", (PyCFunction)reader_post_touches, METH_O, "post_touches([(where, generation), ...])"},
    {"set_ring", (PyCFunction)reader_set_ring, METH_VARARGS, "set_ring(ring_off, head_off) or set_ring(None)"},
    {"counts", (PyCFunction)reader_counts, METH_NOARGS, "-> {gets, hits, misses, get_bytes} of this reader's reads"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "beluga._native.Reader",
    .tp_basicsize = sizeof(ReaderObject),
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Reader(buf, table_off, buckets, tseq_off, granularity, max_slots, segments, segment_size, "
              "headers_off, segments_off): readpath.PyReader in C",
    .tp_methods = reader_methods,
    .tp_init = (initproc)reader_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------ cache-line flushes
 * For pools that hardware does not keep coherent between hosts (multi-host CXL
 * without back-invalidate): the store writes back what it publishes and
 * invalidates what it is about to read (beluga/coherence.py calls these).
 *
 *   writeback(buf, offset, length)   write back every 64-byte line touching the range
 *                                    (clwb, else clflushopt, else clflush); no fence
 *   invalidate(buf, offset, length)  write back and drop every such line (clflushopt,
 *                                    else clflush), then mfence: later loads miss
 *   fence()                          order the writebacks before later stores
 *                                    (sfence; mfence when only clflush is there)
 *   FLUSH_METHOD, INVALIDATE_METHOD, FENCE_METHOD: the instructions CPUID chose
 */
#define FLUSH_LINE 64

enum { FL_NONE = 0, FL_CLFLUSH = 1, FL_CLFLUSHOPT = 2, FL_CLWB = 3 };
static int flush_kind, inval_kind;
static const char *const flush_names[] = {"none", "clflush", "clflushopt", "clwb"};

#ifdef HAVE_X86
#include <cpuid.h>

static void flush_detect(void) {
    unsigned a, b, c, d;
    int has_clflush = 0, has_opt = 0, has_clwb = 0;
    if (__get_cpuid(1, &a, &b, &c, &d))
        has_clflush = (d >> 19) & 1;
    if (__get_cpuid_max(0, NULL) >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        has_opt = (b >> 23) & 1;
        has_clwb = (b >> 24) & 1;
    }
    const char *force = getenv("BELUGA_FLUSH");  /* clflush|clflushopt|clwb: test a weaker choice */
    if (force && strcmp(force, "clflush") == 0)
        has_opt = has_clwb = 0;
    else if (force && strcmp(force, "clflushopt") == 0)
        has_clwb = 0;
    flush_kind = has_clwb ? FL_CLWB : has_opt ? FL_CLFLUSHOPT : has_clflush ? FL_CLFLUSH : FL_NONE;
    inval_kind = has_opt ? FL_CLFLUSHOPT : has_clflush ? FL_CLFLUSH : FL_NONE;
}

__attribute__((target("clwb"))) static void lines_clwb(const uint8_t *p, const uint8_t *end) {
    for (; p < end; p += FLUSH_LINE)
        _mm_clwb((void *)p);
}

__attribute__((target("clflushopt"))) static void lines_clflushopt(const uint8_t *p, const uint8_t *end) {
    for (; p < end; p += FLUSH_LINE)
        _mm_clflushopt((void *)p);
}

static void lines_clflush(const uint8_t *p, const uint8_t *end) {
    for (; p < end; p += FLUSH_LINE)
        _mm_clflush(p);
}

static void flush_lines(int kind, const uint8_t *start, size_t n) {
    const uint8_t *p = (const uint8_t *)((uintptr_t)start & ~(uintptr_t)(FLUSH_LINE - 1));
    const uint8_t *end = start + n;
    switch (kind) {
    case FL_CLWB: lines_clwb(p, end); break;
    case FL_CLFLUSHOPT: lines_clflushopt(p, end); break;
    case FL_CLFLUSH: lines_clflush(p, end); break;
    default: break;
    }
}

static void fence_for(int kind) {
    /* clwb and clflushopt are ordered only by a fence; clflush is ordered with
     * stores already, mfence also orders it before later loads. */
    if (kind == FL_CLFLUSH)
        _mm_mfence();
    else if (kind != FL_NONE)
        _mm_sfence();
}
#else
static void flush_detect(void) { flush_kind = inval_kind = FL_NONE; }
static void flush_lines(int kind, const uint8_t *start, size_t n) { (void)kind; (void)start; (void)n; }
static void fence_for(int kind) { (void)kind; __atomic_thread_fence(__ATOMIC_SEQ_CST); }
#endif

static int flush_args(PyObject *args, const char *name, Py_buffer *view, unsigned long long *off,
                      unsigned long long *len) {
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "OKK", &obj, off, len))
        return -1;
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (*off > (unsigned long long)view->len || *len > (unsigned long long)view->len - *off) {
        PyErr_Format(PyExc_ValueError, "%s: range %llu+%llu is outside the %zd-byte buffer", name, *off, *len,
                     view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *py_writeback(PyObject *self, PyObject *args) {
    Py_buffer view;
    unsigned long long off, len;
    if (flush_args(args, "writeback", &view, &off, &len) < 0)
        return NULL;
    if (len)
        flush_lines(flush_kind, (const uint8_t *)view.buf + off, len);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static void inval_lines(const uint8_t *p, size_t n) {
    flush_lines(inval_kind, p, n);
#ifdef HAVE_X86
    if (inval_kind != FL_NONE)
        _mm_mfence();
#endif
}

static PyObject *py_invalidate(PyObject *self, PyObject *args) {
    Py_buffer view;
    unsigned long long off, len;
    if (flush_args(args, "invalidate", &view, &off, &len) < 0)
        return NULL;
    if (len)
        flush_lines(inval_kind, (const uint8_t *)view.buf + off, len);
#ifdef HAVE_X86
    if (inval_kind != FL_NONE)
        _mm_mfence();  /* the lines are gone before any later load: it misses and fetches */
#endif
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *py_fence(PyObject *self, PyObject *noargs) {
    fence_for(flush_kind);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"crc32", py_crc32, METH_VARARGS, "crc32(data, value=0) -> CRC-32 as zlib.crc32"},
    {"probe", py_probe, METH_VARARGS, "probe(buf, table_off, buckets, tseq_off, key) -> hit tuple, None or False"},
    {"probe_prefix", py_probe_prefix, METH_VARARGS,
     "probe_prefix(buf, table_off, buckets, tseq_off, keys, ring_off, head_off, head) -> (hits, head, busy)"},
    {"copy_crc", py_copy_crc, METH_VARARGS, "copy_crc(dest, src, stream=False) -> CRC-32 of the bytes copied"},
    {"read_into", py_read_into, METH_VARARGS, "read_into(buf, dest, hoff, doff, key, gen, length, crc) -> status"},
    {"read_bytes", py_read_bytes, METH_VARARGS, "read_bytes(buf, hoff, doff, key, gen, length, crc) -> bytes or status"},
    {"writeback", py_writeback, METH_VARARGS, "writeback(buf, offset, length): write back the lines (no fence)"},
    {"invalidate", py_invalidate, METH_VARARGS, "invalidate(buf, offset, length): write back and drop the lines, mfence"},
    {"fence", py_fence, METH_NOARGS, "fence(): order earlier writebacks before later stores"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "beluga._native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    crc_init();
#ifdef HAVE_X86
    __builtin_cpu_init();
    have_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
    have_avx512 = have_clmul && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq")
        && getenv("BELUGA_NATIVE_NO_AVX512") == NULL;
#endif
    flush_detect();
    if (PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m) {
        Py_INCREF(&ReaderType);
        if (PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0) {
            Py_DECREF(&ReaderType);
            Py_DECREF(m);
            return NULL;
        }
        PyModule_AddStringConstant(m, "FLUSH_METHOD", flush_names[flush_kind]);
        PyModule_AddStringConstant(m, "INVALIDATE_METHOD", flush_names[inval_kind]);
        PyModule_AddStringConstant(m, "FENCE_METHOD", flush_kind == FL_CLFLUSH ? "mfence" : flush_kind == FL_NONE ? "none" : "sfence");
#ifdef HAVE_X86
        PyModule_AddIntConstant(m, "CLMUL", have_clmul + have_avx512);
#else
        PyModule_AddIntConstant(m, "CLMUL", 0);
#endif
    }
    return m;
}
