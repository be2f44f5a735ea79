/*
 * Nested mode (protocol.h, N): this guest becomes a minimal L1 hypervisor
 * under AMD SVM and an L2 does the write/read passes under nested paging, so
 * the host KVM shadows L1's NPT (its guest_mode shadow pages) and dirty
 * logging goes through that MMU.
 *
 * Layout: L1 (the BSP) stays at CPL0 from N on and owns the UART. L2 runs at
 * CPL0 on L1's own page tables (its CR3 is L1's), so its GPAs must be L1's:
 * the NPT identity-maps low memory (image, stacks, L1's page tables) with 2M
 * pages and the test region with pages of 1 << l2_shift, chosen apart from
 * L1's own mapping. Nothing else is in the NPT: the test hook F can make L2
 * touch a GPA outside it. L1 and L2 share `job` (low memory, same GPA).
 *
 * The VMCB follows the KVM selftests' generic_svm_setup(): L1's segments,
 * control registers and EFER, intercepts VMRUN and VMMCALL (plus every
 * exception and SHUTDOWN, so that a broken L2 is reported, not run on), ASID
 * 1, NP_ENABLE with nested_cr3. No NRIP save (QEMU's TCG SVM lacks it): after
 * VMMCALL, L1 steps L2's RIP over it by hand.
 */
#include "guest.h"

#define MSR_EFER 0xc0000080
#define EFER_SVME (1UL << 12)
#define MSR_VM_CR 0xc0010114
#define VM_CR_SVMDIS (1UL << 4)
#define MSR_VM_HSAVE_PA 0xc0010117
#define MSR_PAT 0x277

#define EXIT_VMMCALL 0x81
#define VMMCALL_LEN 3         /* 0f 01 d9 */

struct vmcb_seg { u16 sel, attr; u32 limit; u64 base; };

/* Only the fields we use; offsets from the APM (vol. 2, appendix B). */
struct vmcb {
	/* control area */
	u32 icpt_cr, icpt_dr, icpt_exc;
	u64 icpt;                       /* 0x0c: vectors 3 and 4 of the APM */
	u8 r0[0x58 - 0x14];
	u32 asid;                       /* 0x58 */
	u8 tlb_ctl, r1[0x70 - 0x5d];
	u64 exit_code, exit_info1, exit_info2, exit_int_info;  /* 0x70 */
	u64 np_enable;                  /* 0x90 */
	u8 r2[0xb0 - 0x98];
	u64 n_cr3;                      /* 0xb0 */
	u8 r3[0x400 - 0xb8];
	/* state save area */
	struct vmcb_seg es, cs, ss, ds, fs, gs, gdtr, ldtr, idtr, tr;
	u8 r4[0x4cb - 0x4a0];
	u8 cpl;                         /* 0x4cb */
	u32 r5;
	u64 efer;                       /* 0x4d0 */
	u8 r6[0x548 - 0x4d8];
	u64 cr4, cr3, cr0, dr7, dr6, rflags, rip;  /* 0x548 */
	u8 r7[0x5d8 - 0x580];
	u64 rsp;                        /* 0x5d8 */
	u8 r8[0x5f8 - 0x5e0];
	u64 rax;                        /* 0x5f8 */
	u8 r9[0x668 - 0x600];
	u64 g_pat;                      /* 0x668 */
	u8 r10[0x1000 - 0x670];
} __attribute__((packed, aligned(4096)));
_Static_assert(__builtin_offsetof(struct vmcb, exit_code) == 0x70, "vmcb layout");
_Static_assert(__builtin_offsetof(struct vmcb, n_cr3) == 0xb0, "vmcb layout");
_Static_assert(__builtin_offsetof(struct vmcb, efer) == 0x4d0, "vmcb layout");
_Static_assert(__builtin_offsetof(struct vmcb, rip) == 0x578, "vmcb layout");
_Static_assert(__builtin_offsetof(struct vmcb, g_pat) == 0x668, "vmcb layout");
_Static_assert(sizeof(struct vmcb) == 0x1000, "vmcb layout");

#define ICPT_SHUTDOWN (1UL << 31)
#define ICPT_VMRUN (1UL << 32)        /* required, or VMRUN fails */
#define ICPT_VMMCALL (1UL << 33)

/* VMCB segment attributes: descriptor bits 47:40 and 55:52, packed */
#define SEG_DATA 0xc93                /* present, writable, accessed, D/B, G */
#define SEG_CODE64 0x29b              /* present, exec/read, accessed, L */

static struct vmcb vmcb;
static u8 hsave[4096] __attribute__((aligned(4096)));
static char l2_stack[16384] __attribute__((aligned(16)));

/* The command L2 runs next and its result: written by one side while the other is stopped. */
static struct { u64 op, a[6], result; } job;

/* ---- L2 ------------------------------------------------------------------------------ */
/* Each VMRUN continues after the previous VMMCALL, i.e. at the top of the loop. */
static void l2_main(void) __attribute__((noreturn, used));
static void l2_main(void)
{
	for (;;) {
		switch (job.op) {
		case 'W':
			job.result = write_pass(job.a[0], job.a[1], job.a[2], job.a[3], job.a[4], job.a[5]);
			break;
		case 'R':
			job.result = read_pass(job.a[0], job.a[1]);
			break;
		case 'F':
			job.result = *(volatile u64 *)job.a[0];
			break;
		case 'H':
			for (;;)
				__asm__ volatile("pause");
		}
		__asm__ volatile("vmmcall" ::: "memory");
	}
}

/* ---- L1 ------------------------------------------------------------------------------ */
static void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static void vmcb_seg(struct vmcb_seg *s, u16 sel, u16 attr)
{
	*s = (struct vmcb_seg){ .sel = sel, .attr = attr, .limit = 0xffffffff, .base = 0 };
}

/* L2 starts where L1 is now: same segments, control registers and EFER
 * (SVME included, which VMRUN requires), its own stack and entry point. */
static void vmcb_init(u64 *npt)
{
	struct { u16 limit; u64 base; } __attribute__((packed)) dt;
	u64 v;

	vmcb.icpt_exc = 0xffffffff;
	vmcb.icpt = ICPT_SHUTDOWN | ICPT_VMRUN | ICPT_VMMCALL;
	vmcb.asid = 1;
	vmcb.tlb_ctl = 1;                 /* flush this ASID on the first VMRUN */
	vmcb.np_enable = 1;
	vmcb.n_cr3 = (u64)npt;

	vmcb_seg(&vmcb.cs, 0x08, SEG_CODE64);
	vmcb_seg(&vmcb.ds, 0x10, SEG_DATA);
	vmcb_seg(&vmcb.es, 0x10, SEG_DATA);
	vmcb_seg(&vmcb.ss, 0x10, SEG_DATA);
	__asm__ volatile("sgdt %0" : "=m"(dt));
	vmcb.gdtr.limit = dt.limit;
	vmcb.gdtr.base = dt.base;
	__asm__ volatile("sidt %0" : "=m"(dt));
	vmcb.idtr.limit = dt.limit;
	vmcb.idtr.base = dt.base;
	vmcb.cpl = 0;
	rdmsr_safe(MSR_EFER, &vmcb.efer);
	__asm__ volatile("mov %%cr0, %0" : "=r"(v));
	vmcb.cr0 = v;
	__asm__ volatile("mov %%cr3, %0" : "=r"(v));
	vmcb.cr3 = v;
	__asm__ volatile("mov %%cr4, %0" : "=r"(v));
	vmcb.cr4 = v;
	vmcb.dr6 = 0xffff0ff0;
	vmcb.dr7 = 0x400;
	vmcb.rflags = 2;                  /* IF=0: L2 takes no interrupts */
	vmcb.rip = (u64)l2_main;
	vmcb.rsp = (u64)(l2_stack + sizeof(l2_stack) - 8);   /* as if called */
	rdmsr_safe(MSR_PAT, &vmcb.g_pat);
}

/* Run L2 until it VMMCALLs back (1) or exits any other way (0, reported as L2EXIT). */
static int l2_run(void)
{
	struct line l;
	svm_run((u64)&vmcb);
	vmcb.tlb_ctl = 0;
	if (vmcb.exit_code == EXIT_VMMCALL) {
		vmcb.rip += VMMCALL_LEN;
		return 1;
	}
	l_start(&l, 0, "L2EXIT");
	l_hex(&l, vmcb.exit_code);
	l_hex(&l, vmcb.exit_info1);
	l_hex(&l, vmcb.exit_info2);
	l_hex(&l, vmcb.rip);
	l_send(&l);
	return 0;
}

/* The command loop of L1: the W/R protocol of umain(), done by L2. After an
 * L2EXIT, L2's state is unknown, so only Q is still obeyed. */
static void l1_loop(void) __attribute__((noreturn));
static void l1_loop(void)
{
	struct line l;
	char cmd[128];
	u64 a[6];
	int dead = 0;

	for (;;) {
		read_line(cmd, sizeof(cmd));
		int n = parse_hex(cmd + 1, a, 6);
		if (cmd[0] == 'Q')
			guest_exit(0);
		if (dead) {
			l_start(&l, 0, "ERR L2 is gone (L2EXIT): ");
			l_str(&l, cmd);
			l_send(&l);
			continue;
		}
		int ok = 0;
		switch (cmd[0]) {
		case 'W':
			ok = n == 6 && a[4] + a[5] <= region_pages && a[2] <= 100;
			break;
		case 'R':
			ok = n == 2 && a[0] + a[1] <= region_pages;
			break;
		case 'F':
			ok = n == 1;
			break;
		case 'H':
			ok = n == 0;
			break;
		}
		if (!ok) {
			l_start(&l, 0, "ERR bad command: ");
			l_str(&l, cmd);
			l_send(&l);
			continue;
		}
		job.op = (u64)cmd[0];
		for (int i = 0; i < 6; i++)
			job.a[i] = a[i];
		if (!l2_run()) {
			dead = 1;
			continue;
		}
		if (cmd[0] == 'W') {
			l_start(&l, 0, "DONE W");
			l_hex(&l, a[0]);
		} else {
			l_start(&l, 0, cmd[0] == 'R' ? "DONE R" : "DONE F");
		}
		l_hex(&l, job.result);
		l_send(&l);
	}
}

const char *l1_enter(u64 l2_shift)
{
	u32 eax, ebx, ecx, edx, max;
	u64 v;

	if (l2_shift != 12 && l2_shift != 21 && l2_shift != 30)
		return "cannot map L2: l2_shift must be c, 15 or 1e";
	/* the reasons are what the host reports when it skips a nested scenario */
	cpuid(0x80000000, &max, &ebx, &ecx, &edx);
	cpuid(0x80000001, &eax, &ebx, &ecx, &edx);
	if (max < 0x80000001 || !(ecx & (1 << 2)))
		return "svm unavailable: no SVM in CPUID 8000_0001 ECX[2]";
	cpuid(0x8000000a, &eax, &ebx, &ecx, &edx);
	if (max < 0x8000000a || !(edx & 1))
		return "svm unavailable: no nested paging in CPUID 8000_000A EDX[0]";
	if (rdmsr_safe(MSR_VM_CR, &v))
		return "svm unavailable: reading VM_CR faulted";
	if (v & VM_CR_SVMDIS)
		return "svm unavailable: VM_CR.SVMDIS is set";
	if (rdmsr_safe(MSR_EFER, &v) || wrmsr_safe(MSR_EFER, v | EFER_SVME))
		return "svm unavailable: setting EFER.SVME faulted";
	if (rdmsr_safe(MSR_EFER, &v) || !(v & EFER_SVME))
		return "svm unavailable: EFER.SVME does not stick";
	if (wrmsr_safe(MSR_VM_HSAVE_PA, (u64)hsave))
		return "svm unavailable: writing VM_HSAVE_PA faulted";

	/* Everything L2 touches outside the test region lies below pt_next:
	 * the image (code, stacks, job) and L1's page tables, which L2 walks. */
	u64 low = (pt_next + (1UL << 21) - 1) & ~((1UL << 21) - 1);
	u64 before = pt_next;
	u64 *npt = pt_alloc();
	if (!region_pages || region_base < low)
		return "cannot map L2: no test region, or it overlaps low memory";
	if (!npt || map_region(npt, 0, low, 21) ||
	    map_region(npt, region_base, region_pages << PAGE_SHIFT, (u32)l2_shift))
		return "cannot map L2 region (alignment or page-table memory)";

	vmcb_init(npt);
	struct line l;
	l_start(&l, 0, "NESTED");
	l_hex(&l, l2_shift);
	l_hex(&l, (pt_next - before) >> 12);
	l_send(&l);
	l1_loop();
}
