/*
 * What guest.c shares with svm.c (the nested L1/L2 layer): the UART line
 * helpers, the page-table builder and the workload itself, so that L2 runs
 * the very code L1 runs in the non-nested case.
 */
#include "protocol.h"

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define PTE_P 1UL
#define PTE_W 2UL
#define PTE_U 4UL
#define PTE_PS 0x80UL
#define PTE_FLAGS (PTE_P | PTE_W | PTE_U)

#define NESTED_VEC 0x20    /* the CPL3 -> CPL0 gate that N goes through */

struct line { char buf[160]; u64 n; };

void l_str(struct line *l, const char *s);
void l_hex(struct line *l, u64 v);
void l_start(struct line *l, u64 cpu, const char *what);
void l_send(struct line *l);
u64 read_line(char *buf, u64 size);
int parse_hex(const char *s, u64 *out, int max);
void guest_exit(u8 code) __attribute__((noreturn));

extern u64 pt_next;
u64 *pt_alloc(void);
int map_region(u64 *root, u64 gpa, u64 size, u32 shift);

extern u64 region_base, region_pages;
u64 write_pass(u64 pass, u64 pattern, u64 pct, u64 seed, u64 first, u64 n);
u64 read_pass(u64 first, u64 n);

/* boot.S */
int rdmsr_safe(u32 msr, u64 *val);     /* 0, or 1 if it faulted */
int wrmsr_safe(u32 msr, u64 val);
void svm_run(u64 vmcb_pa);

/* svm.c: runs at CPL0 from the NESTED_VEC gate; returns the ERR text only
   when nested mode cannot be had, otherwise becomes L1 for good. */
const char *l1_enter(u64 l2_shift);
