/* Outputs made in place (Linux, CPU workers): the model's large tensors are allocated in
 * the worker's response arena, so a reply names an output where it already is instead of
 * copying it there.
 *
 * torch allocates CPU tensor memory in libc10 (c10::alloc_cpu calls posix_memalign, and
 * its deleter calls free). install() maps the response arena's memfd a second time, for
 * good (a tensor may outlive every Python object of the worker), and points libc10's
 * import slots for posix_memalign and free at the two hooks below (in its GOT, made
 * writable for the moment of the change when it lies in the RELRO segment); the same
 * is done for free in libtorch_cpu, which could free what libc10 allocated. Nothing
 * else in the process is touched: other libraries keep calling glibc directly.
 *
 * While enabled (the worker turns it on around a model call), an allocation through
 * libc10 of at least min_bytes, with an alignment of at most PAGE, is served from the
 * arena, as long as the hooked allocations in use stay within hook_limit bytes;
 * anything else goes to glibc. free() of a pointer inside the arena gives the block back;
 * any other pointer goes to glibc. alloc()/free_offset() serve the worker's own copies
 * (an output that is not in the arena) from the same heap, up to its whole size.
 *
 * A child forked from such a process (a model that forks) shares the arena with its
 * parent: it allocates nothing there and frees nothing there.
 *
 * The heap: first-fit over a sorted array of free blocks, coalesced on free, under one
 * mutex (torch's intra-op threads allocate too). Each block begins with a 64-byte header
 * (block start and size, a magic word) right before the pointer handed out.
 *
 * Python API: see outheap.py, the only module that imports this one.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <link.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HEADER 64
#define PAGE 4096
#define MAGIC 0x6c74727468656170ULL /* "ltrtheap" */

#if defined(__x86_64__)
#define R_SLOT R_X86_64_JUMP_SLOT
#define R_GLOB R_X86_64_GLOB_DAT
#define R_ABS R_X86_64_64
#elif defined(__aarch64__)
#define R_SLOT R_AARCH64_JUMP_SLOT
#define R_GLOB R_AARCH64_GLOB_DAT
#define R_ABS R_AARCH64_ABS64
#else
#define R_SLOT (-1)
#define R_GLOB (-1)
#define R_ABS (-1)
#endif

typedef struct {
    uint64_t magic;
    uint64_t start; /* the block's offset in the arena */
    uint64_t size;  /* the block's bytes, header and alignment padding included */
    uint64_t hooked;
} header_t;

typedef int (*memalign_fn)(void **, size_t, size_t);
typedef void (*free_fn)(void *);

static struct {
    char *base; /* our own mapping of the arena (never unmapped) */
    size_t size;
    size_t min_bytes;
    size_t hook_limit;
    volatile int enabled;
    /* this process is a fork of the one that installed the heap: it shares the arena
     * with its parent, so it must neither allocate there nor free there */
    int forked;
    pthread_mutex_t mu;
    size_t *starts, *sizes; /* free blocks, sorted by start */
    size_t nfree, capfree;
    size_t used, hooked_used;
    uint64_t hooked_allocs, fallbacks, explicit_allocs;
    memalign_fn real_memalign;
    free_fn real_free;
} H = {.mu = PTHREAD_MUTEX_INITIALIZER};

static int in_arena(const void *p) {
    return H.base != NULL && (const char *)p >= H.base && (const char *)p < H.base + H.size;
}

/* Remove [start, start+size) from free block i (which holds it), keeping what is left
 * on either side. Returns 0, or -1 when the array could not grow (nothing changed). */
static int carve(size_t i, size_t start, size_t size) {
    size_t bstart = H.starts[i], bsize = H.sizes[i];
    size_t before = start - bstart, after = bstart + bsize - (start + size);
    if (before && after) {
        if (H.nfree == H.capfree) {
            size_t cap = H.capfree * 2;
            size_t *s = realloc(H.starts, cap * sizeof(size_t));
            if (s == NULL) return -1;
            H.starts = s;
            size_t *z = realloc(H.sizes, cap * sizeof(size_t));
            if (z == NULL) return -1;
            H.sizes = z;
            H.capfree = cap;
        }
        memmove(H.starts + i + 2, H.starts + i + 1, (H.nfree - i - 1) * sizeof(size_t));
        memmove(H.sizes + i + 2, H.sizes + i + 1, (H.nfree - i - 1) * sizeof(size_t));
        H.nfree++;
        H.sizes[i] = before;
        H.starts[i + 1] = start + size;
        H.sizes[i + 1] = after;
    } else if (before) {
        H.sizes[i] = before;
    } else if (after) {
        H.starts[i] = start + size;
        H.sizes[i] = after;
    } else {
        memmove(H.starts + i, H.starts + i + 1, (H.nfree - i - 1) * sizeof(size_t));
        memmove(H.sizes + i, H.sizes + i + 1, (H.nfree - i - 1) * sizeof(size_t));
        H.nfree--;
    }
    return 0;
}

/* A pointer aligned to `align` with `size` bytes after it, or NULL. */
static void *heap_alloc(size_t size, size_t align, int hooked) {
    if (align < HEADER) align = HEADER;
    size_t need = (size + HEADER - 1) / HEADER * HEADER;
    void *out = NULL;
    pthread_mutex_lock(&H.mu);
    for (size_t i = 0; i < H.nfree; i++) {
        size_t bstart = H.starts[i], bend = bstart + H.sizes[i];
        size_t user = (bstart + HEADER + align - 1) / align * align;
        if (user + need > bend) continue;
        size_t start = user - HEADER;
        /* a block starts at a HEADER multiple: keep the gap before it in the free list */
        size_t block = user + need - start;
        if (hooked && H.hooked_used + block > H.hook_limit) break;
        if (carve(i, start, block) != 0) break;
        header_t *h = (header_t *)(H.base + start);
        h->magic = MAGIC;
        h->start = start;
        h->size = block;
        h->hooked = (uint64_t)hooked;
        H.used += block;
        if (hooked) {
            H.hooked_used += block;
            H.hooked_allocs++;
        } else {
            H.explicit_allocs++;
        }
        out = H.base + user;
        break;
    }
    if (out == NULL && hooked) H.fallbacks++;
    pthread_mutex_unlock(&H.mu);
    return out;
}

/* Give back the block of `p` (a pointer heap_alloc returned). Returns -1 if it is not one. */
static int heap_free(void *p) {
    header_t *h = (header_t *)((char *)p - HEADER);
    pthread_mutex_lock(&H.mu);
    if ((char *)h < H.base || h->magic != MAGIC || h->start + h->size > H.size) {
        pthread_mutex_unlock(&H.mu);
        return -1;
    }
    size_t start = h->start, size = h->size;
    h->magic = 0;
    H.used -= size;
    if (h->hooked) H.hooked_used -= size;
    size_t lo = 0, hi = H.nfree; /* first free block after start */
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (H.starts[mid] < start) lo = mid + 1;
        else hi = mid;
    }
    size_t i = lo;
    int next = i < H.nfree && H.starts[i] == start + size;
    int prev = i > 0 && H.starts[i - 1] + H.sizes[i - 1] == start;
    if (prev && next) {
        H.sizes[i - 1] += size + H.sizes[i];
        memmove(H.starts + i, H.starts + i + 1, (H.nfree - i - 1) * sizeof(size_t));
        memmove(H.sizes + i, H.sizes + i + 1, (H.nfree - i - 1) * sizeof(size_t));
        H.nfree--;
    } else if (prev) {
        H.sizes[i - 1] += size;
    } else if (next) {
        H.starts[i] = start;
        H.sizes[i] += size;
    } else {
        if (H.nfree == H.capfree) {
            /* cannot grow without allocating: the block stays lost (never seen with a
             * coalescing first-fit, whose free blocks are bounded by live ones + 1) */
            size_t cap = H.capfree * 2;
            size_t *s = realloc(H.starts, cap * sizeof(size_t));
            size_t *z = s ? realloc(H.sizes, cap * sizeof(size_t)) : NULL;
            if (s) H.starts = s;
            if (z == NULL) {
                pthread_mutex_unlock(&H.mu);
                return 0;
            }
            H.sizes = z;
            H.capfree = cap;
        }
        memmove(H.starts + i + 1, H.starts + i, (H.nfree - i) * sizeof(size_t));
        memmove(H.sizes + i + 1, H.sizes + i, (H.nfree - i) * sizeof(size_t));
        H.starts[i] = start;
        H.sizes[i] = size;
        H.nfree++;
    }
    pthread_mutex_unlock(&H.mu);
    return 0;
}

static int hook_memalign(void **out, size_t align, size_t size) {
    if (H.enabled && !H.forked && size >= H.min_bytes && align <= PAGE && (align & (align - 1)) == 0) {
        void *p = heap_alloc(size, align, 1);
        if (p != NULL) {
            *out = p;
            return 0;
        }
    }
    return H.real_memalign(out, align, size);
}

static void hook_free(void *p) {
    if (in_arena(p)) {
        if (!H.forked) heap_free(p); /* (a fork's copy of a block stays: it is its parent's) */
        return;
    }
    H.real_free(p);
}

/* In a child forked while the heap was installed (a model that forks): the arena is
 * shared with the parent, so the child leaves it alone. The mutex may have been held by
 * another thread at the fork: it is made anew. */
static void after_fork_in_child(void) {
    H.forked = 1;
    H.enabled = 0;
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    H.mu = fresh;
}

/* ---- the import slots ---- */

typedef struct {
    const char *library; /* the file name the object's path ends with */
    int alloc;           /* also redirect posix_memalign */
    int patched_alloc, patched_free;
    int error;
} patch_t;

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0 && (n == k || s[n - k - 1] == '/');
}

static int set_slot(void **slot, void *value, uintptr_t relro_start, uintptr_t relro_end) {
    if (*slot == value) return 0;
    uintptr_t page = (uintptr_t)slot & ~(uintptr_t)(PAGE - 1);
    int relro = (uintptr_t)slot >= relro_start && (uintptr_t)slot < relro_end;
    if (relro && mprotect((void *)page, PAGE, PROT_READ | PROT_WRITE) != 0) return -1;
    __atomic_store_n(slot, value, __ATOMIC_SEQ_CST);
    if (relro) mprotect((void *)page, PAGE, PROT_READ);
    return 0;
}

static int patch_object(struct dl_phdr_info *info, size_t n, void *arg) {
    patch_t *p = arg;
    if (info->dlpi_name == NULL || !ends_with(info->dlpi_name, p->library)) return 0;
    ElfW(Addr) base = info->dlpi_addr;
    const ElfW(Dyn) *dyn = NULL;
    uintptr_t relro_start = 0, relro_end = 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type == PT_DYNAMIC) dyn = (const ElfW(Dyn) *)(base + ph->p_vaddr);
        if (ph->p_type == PT_GNU_RELRO) {
            relro_start = (base + ph->p_vaddr) & ~(uintptr_t)(PAGE - 1);
            relro_end = base + ph->p_vaddr + ph->p_memsz;
        }
    }
    if (dyn == NULL) return 0;
    const ElfW(Sym) *symtab = NULL;
    const char *strtab = NULL;
    const ElfW(Rela) *tables[2] = {NULL, NULL};
    size_t sizes[2] = {0, 0};
    for (; dyn->d_tag != DT_NULL; dyn++) {
        ElfW(Addr) v = dyn->d_un.d_ptr;
        ElfW(Addr) at = v < base ? v + base : v; /* (some loaders leave them unrelocated) */
        switch (dyn->d_tag) {
        case DT_SYMTAB: symtab = (const ElfW(Sym) *)at; break;
        case DT_STRTAB: strtab = (const char *)at; break;
        case DT_JMPREL: tables[0] = (const ElfW(Rela) *)at; break;
        case DT_PLTRELSZ: sizes[0] = dyn->d_un.d_val; break;
        case DT_RELA: tables[1] = (const ElfW(Rela) *)at; break;
        case DT_RELASZ: sizes[1] = dyn->d_un.d_val; break;
        }
    }
    if (symtab == NULL || strtab == NULL) return 0;
    for (int t = 0; t < 2; t++) {
        if (tables[t] == NULL) continue;
        for (size_t k = 0; k < sizes[t] / sizeof(ElfW(Rela)); k++) {
            const ElfW(Rela) *r = &tables[t][k];
            long type = (long)ELF64_R_TYPE(r->r_info);
            if (type != R_SLOT && type != R_GLOB && type != R_ABS) continue;
            size_t sym = ELF64_R_SYM(r->r_info);
            if (sym == 0) continue;
            const char *name = strtab + symtab[sym].st_name;
            void **slot = (void **)(base + r->r_offset);
            if (p->alloc && strcmp(name, "posix_memalign") == 0) {
                if (set_slot(slot, (void *)hook_memalign, relro_start, relro_end) != 0) p->error = errno;
                else p->patched_alloc++;
            } else if (strcmp(name, "free") == 0) {
                if (set_slot(slot, (void *)hook_free, relro_start, relro_end) != 0) p->error = errno;
                else p->patched_free++;
            }
        }
    }
    return 1;
}

/* ---- Python ---- */

static PyObject *py_install(PyObject *self, PyObject *args) {
    int fd;
    Py_ssize_t size, min_bytes, hook_limit;
    if (!PyArg_ParseTuple(args, "innn", &fd, &size, &min_bytes, &hook_limit)) return NULL;
    if (H.base != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the output heap is installed already in this process");
        return NULL;
    }
    if (size < PAGE || min_bytes < 0 || hook_limit < 0) {
        PyErr_SetString(PyExc_ValueError, "size must be at least a page; min_bytes and hook_limit not negative");
        return NULL;
    }
    if (R_SLOT < 0) {
        PyErr_SetString(PyExc_OSError, "this architecture's relocations are not known (x86_64 and aarch64 are)");
        return NULL;
    }
    H.real_memalign = (memalign_fn)dlsym(RTLD_DEFAULT, "posix_memalign");
    H.real_free = (free_fn)dlsym(RTLD_DEFAULT, "free");
    if (H.real_memalign == NULL || H.real_free == NULL) {
        PyErr_SetString(PyExc_OSError, "posix_memalign or free not found");
        return NULL;
    }
    void *base = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) return PyErr_SetFromErrno(PyExc_OSError);
    H.capfree = 64;
    H.starts = malloc(H.capfree * sizeof(size_t));
    H.sizes = malloc(H.capfree * sizeof(size_t));
    if (H.starts == NULL || H.sizes == NULL) {
        munmap(base, (size_t)size);
        return PyErr_NoMemory();
    }
    H.starts[0] = 0;
    H.sizes[0] = (size_t)size;
    H.nfree = 1;
    H.size = (size_t)size;
    H.min_bytes = (size_t)min_bytes;
    H.hook_limit = (size_t)hook_limit;
    H.base = base; /* before any slot points at the hooks */
    pthread_atfork(NULL, NULL, after_fork_in_child);
    patch_t c10 = {"libc10.so", 1, 0, 0, 0};
    patch_t cpu = {"libtorch_cpu.so", 0, 0, 0, 0};
    dl_iterate_phdr(patch_object, &c10);
    dl_iterate_phdr(patch_object, &cpu);
    if (c10.error || cpu.error) {
        errno = c10.error ? c10.error : cpu.error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("{s:K,s:i,s:i}", "address", (unsigned long long)(uintptr_t)base, "alloc_slots",
                         c10.patched_alloc, "free_slots", c10.patched_free + cpu.patched_free);
}

static PyObject *py_enable(PyObject *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    H.enabled = on && H.base != NULL;
    Py_RETURN_NONE;
}

static PyObject *py_alloc(PyObject *self, PyObject *arg) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "nbytes must not be negative");
        return NULL;
    }
    if (H.base == NULL || H.forked) return PyLong_FromLong(-1);
    void *p = heap_alloc((size_t)n, HEADER, 0);
    return PyLong_FromSsize_t(p == NULL ? -1 : (Py_ssize_t)((char *)p - H.base));
}

static PyObject *py_free(PyObject *self, PyObject *arg) {
    Py_ssize_t offset = PyLong_AsSsize_t(arg);
    if (offset == -1 && PyErr_Occurred()) return NULL;
    if (H.base == NULL || H.forked || offset < HEADER || (size_t)offset >= H.size || heap_free(H.base + offset) != 0) {
        PyErr_Format(PyExc_ValueError, "no allocated block at offset %zd", offset);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_stats(PyObject *self, PyObject *unused) {
    pthread_mutex_lock(&H.mu);
    PyObject *d = Py_BuildValue("{s:n,s:n,s:n,s:K,s:K,s:K,s:n,s:i}", "size", (Py_ssize_t)H.size, "used",
                                (Py_ssize_t)H.used, "hooked_used", (Py_ssize_t)H.hooked_used, "hooked_allocs",
                                (unsigned long long)H.hooked_allocs, "fallbacks", (unsigned long long)H.fallbacks,
                                "explicit_allocs", (unsigned long long)H.explicit_allocs, "free_blocks",
                                (Py_ssize_t)H.nfree, "enabled", (int)H.enabled);
    pthread_mutex_unlock(&H.mu);
    return d;
}

static PyMethodDef methods[] = {
    {"install", py_install, METH_VARARGS, "install(fd, size, min_bytes, hook_limit) -> dict"},
    {"enable", py_enable, METH_O, "enable(on): serve libc10's large allocations from the arena"},
    {"alloc", py_alloc, METH_O, "alloc(nbytes) -> offset, or -1 when full"},
    {"free", py_free, METH_O, "free(offset)"},
    {"stats", py_stats, METH_NOARGS, "the heap's counters"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "libtorchrt.transport._outheap", "Outputs made in place (see outheap.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__outheap(void) { return PyModule_Create(&module); }
