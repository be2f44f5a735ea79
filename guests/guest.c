/*
 * kvmsplit guest: maps a test region, drops to CPL3 and runs write/read
 * passes on the host's command. See protocol.h for the line protocol.
 *
 * Why CPL3: on PVM-style hosts CPL0 is emulated (~0.3 us an instruction) while
 * CPL3 runs natively under shadow paging, so only CPL3 accesses exercise real
 * KVM page faults. Only set-up (page tables, descriptor tables) runs at CPL0.
 * Built freestanding with -mgeneral-regs-only: no SSE, nothing the emulator
 * might not know. Nested mode (N, svm.c) is the exception: the BSP goes back
 * to CPL0 for good, to be an SVM L1 whose L2 runs the passes. W's CPL0 route
 * (write_via = "emulated" on PVM) is the other: that pass runs at CPL0 on
 * purpose, so that KVM's instruction emulator does its stores.
 */
#include "guest.h"

extern u64 boot_pml4[512];
extern u64 gdt_tss[];
extern char _end[];
extern char kstacks[];
extern void enter_user(void *rip, void *rsp, u64 arg) __attribute__((noreturn));

struct tss {
	u32 rsvd0;
	u64 rsp0, rsp1, rsp2;
	u64 rsvd1;
	u64 ist[7];
	u64 rsvd2;
	u16 rsvd3, iomap_base;
	u8 iomap[0x400 / 8 + 1];   /* ports 0-0x3ff; the last byte must be 0xff */
} __attribute__((packed));

struct idt_entry {
	u16 off0, sel;
	u8 ist, type;
	u16 off1;
	u32 off2, rsvd;
} __attribute__((packed));

struct trapframe {
	u64 vec, err, rip, cs, rflags, rsp, ss;
};

static struct tss tss[MAX_CPUS];
static struct idt_entry idt[NESTED_VEC + 1];
static char ustacks[MAX_CPUS][USTACK_SIZE] __attribute__((aligned(4096)));
u64 pt_next;                     /* page-table page allocator (BSP, CPL0) */
static u64 pt_end;

/* ---- port I/O and the UART ---------------------------------------------- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* Byte by byte: PVM raises #GP for string I/O (rep outsb) at CPL3 even with IOPL=3. */
static void put_bytes(const char *s, u64 n)
{
	while (n--)
		outb(COM1, (u8)*s++);
}

static int getc_uart(void)
{
	while (!(inb(COM1 + 5) & 1))
		;
	return inb(COM1);
}

void guest_exit(u8 code)
{
	for (;;)
		outb(EXIT_PORT, code);
}

void l_str(struct line *l, const char *s) { while (*s && l->n < sizeof(l->buf) - 1) l->buf[l->n++] = *s++; }
static void l_hexraw(struct line *l, u64 v)
{
	char t[17]; int i = 16;
	t[i] = 0;
	do { t[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
	l_str(l, t + i);
}
void l_hex(struct line *l, u64 v) { l_str(l, " "); l_hexraw(l, v); }
void l_start(struct line *l, u64 cpu, const char *what) { l->n = 0; l_str(l, "@"); l_hexraw(l, cpu); l_str(l, " "); l_str(l, what); }
void l_send(struct line *l) { l->buf[l->n++] = '\n'; put_bytes(l->buf, l->n); }

u64 read_line(char *buf, u64 size)
{
	u64 n = 0;
	for (;;) {
		int c = getc_uart();
		if (c == '\n' || c == '\r') {
			if (n)
				break;
			continue;
		}
		if (n < size - 1)
			buf[n++] = (char)c;
	}
	buf[n] = 0;
	return n;
}

/* Parse up to `max` hex fields after the command letter. */
int parse_hex(const char *s, u64 *out, int max)
{
	int n = 0;
	while (*s && n < max) {
		while (*s == ' ')
			s++;
		if (!*s)
			break;
		u64 v = 0;
		int digits = 0;
		for (;; s++, digits++) {
			char c = *s;
			if (c >= '0' && c <= '9') v = v * 16 + (u64)(c - '0');
			else if (c >= 'a' && c <= 'f') v = v * 16 + (u64)(c - 'a' + 10);
			else break;
		}
		if (!digits || (*s && *s != ' '))
			return -1;
		out[n++] = v;
	}
	return n;
}

/* ---- CPL0: descriptor tables, page tables ---------------------------------- */
static void set_idt(int vec, void (*fn)(void))
{
	u64 a = (u64)fn;
	idt[vec] = (struct idt_entry){ .off0 = (u16)a, .sel = 0x08, .type = 0x8e,
				       .off1 = (u16)(a >> 16), .off2 = (u32)(a >> 32) };
}

#define ISR_DECL(n) extern void isr##n(void);
ISR_DECL(0) ISR_DECL(1) ISR_DECL(2) ISR_DECL(3) ISR_DECL(4) ISR_DECL(5) ISR_DECL(6) ISR_DECL(7)
ISR_DECL(8) ISR_DECL(9) ISR_DECL(10) ISR_DECL(11) ISR_DECL(12) ISR_DECL(13) ISR_DECL(14) ISR_DECL(15)
ISR_DECL(16) ISR_DECL(17) ISR_DECL(18) ISR_DECL(19) ISR_DECL(20) ISR_DECL(21)
extern void nested_gate(void);
static void (*const isrs[22])(void) = {
	isr0, isr1, isr2, isr3, isr4, isr5, isr6, isr7, isr8, isr9, isr10,
	isr11, isr12, isr13, isr14, isr15, isr16, isr17, isr18, isr19, isr20, isr21,
};

static void cpu_tables(u32 cpu)
{
	struct { u16 limit; u64 base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };
	u64 base = (u64)&tss[cpu];
	u64 *d = &gdt_tss[2 * cpu];

	tss[cpu].rsp0 = (u64)kstacks + ((u64)(cpu + 1) << KSTACK_SHIFT);
	/* Grant the ports we use in the I/O bitmap as well as by IOPL=3: PVM
	 * ignores IOPL at CPL3 but honours the bitmap. Zero bits allow. */
	tss[cpu].iomap_base = __builtin_offsetof(struct tss, iomap);
	tss[cpu].iomap[sizeof(tss[cpu].iomap) - 1] = 0xff;
	d[0] = (sizeof(struct tss) - 1) | ((base & 0xffffff) << 16) | (0x89UL << 40) | ((base >> 24 & 0xff) << 56);
	d[1] = base >> 32;
	if (cpu == 0) {
		for (int i = 0; i < 22; i++)
			set_idt(i, isrs[i]);
		/* N's way back to CPL0 (SVM instructions need it): a DPL3 gate */
		set_idt(NESTED_VEC, nested_gate);
		idt[NESTED_VEC].type = 0xee;
	}
	__asm__ volatile("lidt %0" :: "m"(idtr));
	__asm__ volatile("ltr %w0" :: "r"(0x30 + 16 * cpu));
}

/* A page-table page; `full`: the caller writes all 512 entries. Other
 * pages are zeroed: kvmsplit's loader hands us zeroed memory, but QEMU's
 * multiboot loader leaves its info and command line right after the image,
 * where this allocator starts. Leaf tables skip it (CPL0 stores are slow on PVM). */
static u64 *pt_alloc_page(int full)
{
	if (pt_next + 4096 > pt_end)
		return 0;
	u64 *p = (u64 *)pt_next;
	pt_next += 4096;
	if (!full)
		for (int i = 0; i < 512; i++)
			p[i] = 0;
	return p;
}

u64 *pt_alloc(void) { return pt_alloc_page(0); }

/* Get (allocating) the table that entry `e` points to. */
static u64 *pt_next_level(u64 *e, int full)
{
	if (!(*e & PTE_P)) {
		u64 *t = pt_alloc_page(full);
		if (!t)
			return 0;
		*e = (u64)t | PTE_FLAGS;
	}
	return (u64 *)(*e & ~0xfffUL);
}

static void fill_table(u64 *pt, u64 va)
{
	u64 v = va | PTE_FLAGS;
	for (int i = 0; i < 512; i++, v += 4096)
		pt[i] = v;
}

/* 4K leaf tables of the boot map, filled later at CPL3 (native on PVM, where
 * filling them at CPL0 is emulated store by store: 1.3 s for 1 GiB). Runs of
 * consecutive PDEs, leaf tables and 2M steps; a PDE stays zero (not present,
 * so never cached) until its table is full. */
static struct { u64 *pde, *pt, va, n; } deferred[64];
static int ndeferred;

static int defer_table(u64 *pde, u64 *pt, u64 va)
{
	if (ndeferred) {
		typeof(deferred[0]) *d = &deferred[ndeferred - 1];
		if (d->pde + d->n == pde && d->pt + 512 * d->n == pt && d->va + (d->n << 21) == va) {
			d->n++;
			return 1;
		}
	}
	if (ndeferred == 64)
		return 0;
	deferred[ndeferred].pde = pde;
	deferred[ndeferred].pt = pt;
	deferred[ndeferred].va = va;
	deferred[ndeferred++].n = 1;
	return 1;
}

/* CPL3 (the page-table pool and the PDs lie in the U=1 low identity map). */
static void fill_deferred(void)
{
	for (int i = 0; i < ndeferred; i++)
		for (u64 k = 0; k < deferred[i].n; k++) {
			fill_table(deferred[i].pt + 512 * k, deferred[i].va + (k << 21));
			deferred[i].pde[k] = (u64)(deferred[i].pt + 512 * k) | PTE_FLAGS;
		}
	ndeferred = 0;
}

/* Identity-map [gpa, gpa+size) with pages of 1 << shift under `root`: our
 * own page tables or, in nested mode, L2's NPT (same entry format; NPT walks
 * count as user accesses, hence U=1). `defer`: leave 4K leaf tables to
 * fill_deferred(). Returns 0 or -1. */
static int map_range(u64 *root, u64 gpa, u64 size, u32 shift, int defer)
{
	u64 step = 1UL << shift;
	if ((shift != 12 && shift != 21 && shift != 30) || (gpa | size) & (step - 1))
		return -1;
	for (u64 va = gpa; va < gpa + size;) {
		u64 *pdpt = pt_next_level(&root[va >> 39 & 511], 0);
		if (!pdpt)
			return -1;
		u64 *pdpte = &pdpt[va >> 30 & 511];
		if (shift == 30) {
			*pdpte = va | PTE_FLAGS | PTE_PS;
			va += step;
			continue;
		}
		u64 *pd = pt_next_level(pdpte, 0);
		if (!pd)
			return -1;
		u64 *pde = &pd[va >> 21 & 511];
		if (shift == 21) {
			*pde = va | PTE_FLAGS | PTE_PS;
			va += step;
			continue;
		}
		if (defer && !(*pde & PTE_P)) {
			u64 *pt = pt_alloc_page(1);
			if (!pt)
				return -1;
			if (!defer_table(pde, pt, va)) {
				fill_table(pt, va);
				*pde = (u64)pt | PTE_FLAGS;
			}
			va += 512 * 4096;
			continue;
		}
		u64 *pt = pt_next_level(pde, 1);
		if (!pt)
			return -1;
		fill_table(pt, va);     /* a whole page table in one tight loop: emulated on PVM */
		va += 512 * 4096;
	}
	return 0;
}

int map_region(u64 *root, u64 gpa, u64 size, u32 shift)
{
	return map_range(root, gpa, size, shift, 0);
}

/* ---- CPL3: the workload --------------------------------------------------------- */
u64 region_base, region_pages;

static inline u64 mix64(u64 z)      /* splitmix64's finaliser; ucall.py has the same */
{
	z += 0x9e3779b97f4a7c15UL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
	return z ^ (z >> 31);
}

u64 write_pass(u64 pass, u64 pattern, u64 pct, u64 seed, u64 first, u64 n)
{
	volatile u64 *base = (volatile u64 *)region_base;
	u64 written = 0;
	u64 seq_n = (n * pct + 99) / 100;
	for (u64 i = first; i < first + n; i++) {
		int sel = pattern == 0 ? (i - first) < seq_n
				       : mix64(seed ^ (pass << 40) ^ i) % 100 < pct;
		if (!sel)
			continue;
		base[i << (PAGE_SHIFT - 3)] = (u64)MARKER_TAG << 48 | pass << 32 | i;
		written++;
	}
	return written;
}

/* ---- W's write routes (protocol.h, WV_*): the same pages and markers as write_pass(),
 * written so that KVM's instruction emulator does the stores. At CPL0 (the CPL0
 * route) where the host emulates guest kernel code (PVM), or behind the forced-
 * emulation prefix (KVM_FEP: ud2; .ascii "kvm") where kvm.force_emulation_prefix
 * is set. WV_STRING: each run of up to STRING_PAGES consecutive selected pages
 * a..b is first written by ONE rep stosq or rep movsq (alternately) covering
 * [a, b) whole and b's first qword with STRING_FILL(pass), then each page's
 * first qword gets its marker: the pages written are exactly the selected ones,
 * and a page the pass has touched starts with its marker or the fill. */
#define KVM_FEP "ud2; .byte 0x6b, 0x76, 0x6d; "   /* the kernel selftests' KVM_FEP */
static u64 string_src[STRING_PAGES * 512 + 1];      /* what rep movsq copies: STRING_FILL(pass) */

static inline void store(volatile u64 *p, u64 v, int fep)
{
	if (fep)
		__asm__ volatile(KVM_FEP "movq %1, %0" : "=m"(*p) : "r"(v));
	else
		*p = v;
}

static void string_write(u64 dst, u64 qwords, u64 fill, int movs, int fep)
{
	u64 src = (u64)string_src;
	if (movs && fep)
		__asm__ volatile(KVM_FEP "rep movsq" : "+D"(dst), "+S"(src), "+c"(qwords) :: "memory");
	else if (movs)
		__asm__ volatile("rep movsq" : "+D"(dst), "+S"(src), "+c"(qwords) :: "memory");
	else if (fep)
		__asm__ volatile(KVM_FEP "rep stosq" : "+D"(dst), "+c"(qwords) : "a"(fill) : "memory");
	else
		__asm__ volatile("rep stosq" : "+D"(dst), "+c"(qwords) : "a"(fill) : "memory");
}

static int selected(u64 pass, u64 pattern, u64 pct, u64 seed, u64 first, u64 n, u64 i)
{
	return pattern == 0 ? (i - first) < (n * pct + 99) / 100
			    : mix64(seed ^ (pass << 40) ^ i) % 100 < pct;
}

u64 write_pass_via(u64 pass, u64 pattern, u64 pct, u64 seed, u64 first, u64 n, u64 how)
{
	volatile u64 *base = (volatile u64 *)region_base;
	int fep = (how & WV_ROUTE) == WV_FEP;
	u64 written = 0, runs = 0, fill = STRING_FILL(pass);
	if (how & WV_STRING)
		for (u64 i = 0; i < sizeof(string_src) / 8; i++)
			string_src[i] = fill;
	for (u64 i = first; i < first + n;) {
		if (!selected(pass, pattern, pct, seed, first, n, i)) {
			i++;
			continue;
		}
		u64 k = 1;
		if (how & WV_STRING) {
			while (k < STRING_PAGES && i + k < first + n && selected(pass, pattern, pct, seed, first, n, i + k))
				k++;
			string_write((u64)&base[i << (PAGE_SHIFT - 3)], 512 * (k - 1) + 1, fill, runs++ & 1, fep);
		}
		for (u64 j = i; j < i + k; j++)
			store(&base[j << (PAGE_SHIFT - 3)], (u64)MARKER_TAG << 48 | pass << 32 | j, fep);
		written += k;
		i += k;
	}
	return written;
}

/* The CPL0 route: CPL3 calls cpl0_call() (a ud2 that trap() recognises, as X's
 * way down: PVM answers `int n` at CPL3 with #UD); trap() runs the job at CPL0
 * on this cpu's kernel stack and returns past the ud2. */
static struct { u64 a[7], result; } cpl0_jobs[MAX_CPUS];
extern char cpl0_call_ud[];
void cpl0_call(void);
__asm__(".pushsection .text\ncpl0_call:\ncpl0_call_ud: ud2\n\tret\n.popsection");

static u64 write_pass_routed(u64 cpu, const u64 *a, u64 how)
{
	if ((how & WV_ROUTE) != WV_CPL0)
		return write_pass_via(a[0], a[1], a[2], a[3], a[4], a[5], how);
	for (int i = 0; i < 6; i++)
		cpl0_jobs[cpu].a[i] = a[i];
	cpl0_jobs[cpu].a[6] = how;
	cpl0_call();
	return cpl0_jobs[cpu].result;
}

u64 read_pass(u64 first, u64 n)
{
	volatile u64 *base = (volatile u64 *)region_base;
	u64 x = 0;
	for (u64 i = first; i < first + n; i++)
		x ^= base[i << (PAGE_SHIFT - 3)];
	return x;
}

/* ---- X: a test hook, the guest misbehaving on purpose (protocol.h) ---------------- */
/* X's way to CPL0 is a #UD at misbehave_ud, which trap() recognises: PVM
 * answers `int n` at CPL3 with #UD anyway, but delivers real exceptions. */
extern char misbehave_ud[];
__asm__(".pushsection .text\nmisbehave_ud: ud2\n.popsection");
static u64 misbehave_kind;

static void misbehave_cpl0(u64 kind) __attribute__((noreturn));
static void misbehave_cpl0(u64 kind)
{
	if (kind == 4) {
		struct { u16 limit; u64 base; } __attribute__((packed)) null_idt = { 0, 0 };
		__asm__ volatile("lidt %0; ud2" :: "m"(null_idt));   /* #UD, #DF, shutdown */
	}
	for (;;)
		__asm__ volatile("pause");
}

/* Returns only for an unknown kind. */
static void misbehave(u64 cpu, u64 kind)
{
	struct line l;
	u64 i = 0, r;
	switch (kind) {
	case 0:
	case 4:
		misbehave_kind = kind;
		__asm__ volatile("jmp misbehave_ud" ::: "memory");
		break;
	case 1:
		for (;; i++) {
			r = mix64(i);
			put_bytes((const char *)&r, sizeof(r));
		}
	case 2:
		for (;;)
			put_bytes("this is not the protocol\n", 25);
	case 3:
		for (;;)
			outb(COM1, 'A');
	case 5:
		write_pass(0xee, 0, 100, 0, 0, region_pages / 2);
		l_start(&l, cpu, "DONE W");
		put_bytes(l.buf, l.n);
		guest_exit(MISBEHAVE_EXIT);
	case 6:
		for (;; i++) {
			l.n = 0;
			l_str(&l, "flood");
			l_hex(&l, i);
			l_send(&l);
		}
	case 7:
		for (;;) {
			l_start(&l, cpu, "READY");
			l_send(&l);
		}
	}
}

static u64 mapped[4];    /* the M command's gpa, size, shift, and the page-table pages it took */

static void umain(u64 cpu) __attribute__((noreturn));
static void umain(u64 cpu)
{
	struct line l;
	char cmd[128];
	u64 a[7];

	if (cpu == 0) {
		fill_deferred();
		l_start(&l, 0, "MAPPED");
		for (int i = 0; i < 4; i++)
			l_hex(&l, mapped[i]);
		l_send(&l);
	}
	l_start(&l, cpu, "READY");
	l_send(&l);
	for (;;) {
		read_line(cmd, sizeof(cmd));
		int n = parse_hex(cmd + 1, a, 7);
		switch (cmd[0]) {
		case 'W': {
			u64 how = n == 7 ? a[6] : WV_NATIVE;
			if ((n != 6 && n != 7) || a[4] + a[5] > region_pages || a[2] > 100
			    || how & ~(WV_ROUTE | WV_STRING) || (how & WV_ROUTE) > WV_FEP)
				break;
			l_start(&l, cpu, "DONE W");
			l_hex(&l, a[0]);
			l_hex(&l, how == WV_NATIVE ? write_pass(a[0], a[1], a[2], a[3], a[4], a[5])
						   : write_pass_routed(cpu, a, how));
			l_send(&l);
			continue;
		}
		case 'R':
			if (n != 2 || a[0] + a[1] > region_pages)
				break;
			l_start(&l, cpu, "DONE R");
			l_hex(&l, read_pass(a[0], a[1]));
			l_send(&l);
			continue;
		case 'H':
			for (;;)
				__asm__ volatile("pause");
		case 'Q':
			guest_exit(0);
		case 'X':
			if (n != 1)
				break;
			misbehave(cpu, a[0]);
			break;
		case 'N': {
			if (n != 1)
				break;
			if (cpu != 0) {
				l_start(&l, cpu, "ERR N is for the BSP only");
				l_send(&l);
				continue;
			}
			/* Comes back only if nested mode can't be had; otherwise this
			 * cpu is L1 from now on and never returns to CPL3. */
			u64 shift = a[0];
			const char *why;
			__asm__ volatile("int %[vec]" : "=a"(why), "+D"(shift) : [vec] "i"(NESTED_VEC)
					 : "rcx", "rdx", "rsi", "r8", "r9", "r10", "r11", "memory", "cc");
			l_start(&l, cpu, "ERR ");
			l_str(&l, why);
			l_send(&l);
			continue;
		}
		}
		l_start(&l, cpu, "ERR bad command: ");
		l_str(&l, cmd);
		l_send(&l);
	}
}

/* ---- CPL0 entry ------------------------------------------------------------------ */
struct mbinfo { u32 flags, mem_lower, mem_upper; };

void kmain(u32 cpu, u32 mbinfo_pa)
{
	struct line l;
	char cmd[128];
	u64 a[3];

	cpu_tables(cpu);
	if (cpu == 0) {
		struct mbinfo *mb = (struct mbinfo *)(u64)mbinfo_pa;
		pt_next = ((u64)_end + 4095) & ~4095UL;
		pt_end = 0x100000 + (u64)mb->mem_upper * 1024;
		l_start(&l, 0, "HELLO");
		l_hex(&l, PROTO_VERSION);
		l_hex(&l, MAX_CPUS);
		l_send(&l);
		for (;;) {
			read_line(cmd, sizeof(cmd));
			if (cmd[0] == 'M' && parse_hex(cmd + 1, a, 3) == 3) {
				u64 before = pt_next;
				if (map_range(boot_pml4, a[0], a[1], (u32)a[2], 1) == 0) {
					region_base = a[0];
					region_pages = a[1] >> PAGE_SHIFT;
					for (int i = 0; i < 3; i++)
						mapped[i] = a[i];
					mapped[3] = (pt_next - before) >> 12;
					break;      /* MAPPED comes from CPL3, once the leaf tables are filled */
				}
				ndeferred = 0;
				l_start(&l, 0, "ERR cannot map region (alignment or page-table memory)");
			} else {
				l_start(&l, 0, "ERR expected M <gpa> <size> <shift>: ");
				l_str(&l, cmd);
			}
			l_send(&l);
		}
	}
	enter_user((void *)umain, ustacks[cpu] + USTACK_SIZE, cpu);
}

u64 fixup_rip;   /* set around an MSR access that may fault (boot.S) */

/* An exception: report it and exit. Runs at CPL0 on this cpu's kernel stack.
 * Returns (to iretq) only for a fault that *_msr_safe() expects. */
void trap(struct trapframe *f)
{
	struct line l;
	u64 cr2;
	u16 tr;
	if (fixup_rip && !(f->cs & 3)) {
		f->rip = fixup_rip;
		return;
	}
	if (f->vec == 6 && (f->cs & 3) && f->rip == (u64)misbehave_ud)
		misbehave_cpl0(misbehave_kind);
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	__asm__ volatile("str %0" : "=r"(tr));
	u64 cpu = (u64)(tr - 0x30) / 16;
	if (f->vec == 6 && (f->cs & 3) && f->rip == (u64)cpl0_call_ud) {
		u64 *a = cpl0_jobs[cpu].a;
		cpl0_jobs[cpu].result = write_pass_via(a[0], a[1], a[2], a[3], a[4], a[5], a[6]);
		f->rip += 2;    /* past the ud2, to its ret, back at CPL3 */
		return;
	}
	l_start(&l, cpu, "EXC");
	l_hex(&l, f->vec);
	l_hex(&l, f->err);
	l_hex(&l, f->rip);
	l_hex(&l, cr2);
	l_hex(&l, f->cs);
	l_hex(&l, f->rflags);
	l_send(&l);
	guest_exit((u8)(0x80 | f->vec));
}
