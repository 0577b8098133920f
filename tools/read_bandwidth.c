/* How fast this machine reads memory: the ceiling for a decode step, which reads every weight
 * once. Sums a buffer far larger than the caches with 1..N OpenMP threads and prints
 * "threads GB/s" per line (best of 5). Plain C so the compiler vectorizes it for whatever this
 * CPU has; numpy's reductions here are limited by their arithmetic, not by memory.
 * Build: cc -O3 -march=native -fopenmp read_bandwidth.c -o read_bandwidth
 */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    int max_threads = argc > 1 ? atoi(argv[1]) : omp_get_max_threads();
    size_t n = (size_t)1 << 27; /* 1 GiB of uint64 */
    uint64_t *a = aligned_alloc(64, n * sizeof *a);
    if (!a) return 1;
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) a[i] = i; /* first touch: pages mapped before timing */
    for (int t = 1; t <= max_threads; t++) {
        double best = 1e30;
        uint64_t sink = 0;
        for (int r = 0; r < 5; r++) {
            uint64_t acc = 0;
            double t0 = omp_get_wtime();
#pragma omp parallel for num_threads(t) reduction(^ : acc) schedule(static)
            for (size_t i = 0; i < n; i++) acc ^= a[i];
            double dt = omp_get_wtime() - t0;
            sink ^= acc;
            if (dt < best) best = dt;
        }
        printf("%d %.1f\n", t, n * sizeof *a / best / 1e9);
        if (sink == 42) fprintf(stderr, " "); /* keeps the reads */
    }
    free(a);
    return 0;
}
