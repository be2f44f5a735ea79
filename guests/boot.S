/*
 * kvmsplit guest entry: multiboot v1 (what QEMU -kernel and kvmsplit's own
 * loader both boot), 32-bit protected mode -> long mode -> kmain().
 *
 * Everything here runs at CPL0, which some hosts (PVM) emulate instruction by
 * instruction, so it is kept short: the boot identity map is 512 2M PDEs.
 * Every PDE has U=1 because the workload runs at CPL3 out of the same image.
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000002          /* we want mem_lower/mem_upper */
#define KCODE64 0x08
#define KDATA   0x10
#define KCODE32 0x28

	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.section .text.boot, "ax"
	.code32
	.globl _start
_start:
	cli
	mov	%ebx, %edi                   /* multiboot info (physical) */
	lgdt	gdt_desc
	ljmp	$KCODE32, $1f
1:	mov	$KDATA, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	%ax, %fs
	mov	%ax, %gs

	mov	$1, %eax                     /* initial APIC id = our cpu number */
	cpuid
	shr	$24, %ebx
	mov	%ebx, %esi
	cmp	$MAX_CPUS, %esi
	jae	too_many_cpus

	/* the BSP builds the identity map; APs are started by the host after it */
	test	%esi, %esi
	jnz	2f
	movl	$boot_pdpt + 7, boot_pml4
	movl	$boot_pd + 7, boot_pdpt
	xor	%ecx, %ecx
3:	mov	%ecx, %eax
	shl	$21, %eax
	or	$0x87, %eax                  /* P | W | U | PS */
	mov	%eax, boot_pd(,%ecx,8)
	inc	%ecx
	cmp	$512, %ecx
	jne	3b

2:	mov	%cr4, %eax
	or	$0x20, %eax                  /* PAE */
	mov	%eax, %cr4
	mov	$boot_pml4, %eax
	mov	%eax, %cr3
	mov	$0xC0000080, %ecx            /* EFER.LME */
	rdmsr
	or	$0x100, %eax
	wrmsr
	mov	%cr0, %eax
	or	$0x80010001, %eax            /* PG | WP | PE */
	mov	%eax, %cr0
	ljmp	$KCODE64, $long_mode

too_many_cpus:
	mov	$0xfe, %al
	out	%al, $0xf4
	hlt

	.code64
long_mode:
	mov	$KDATA, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	xor	%eax, %eax
	mov	%ax, %fs
	mov	%ax, %gs
	mov	%esi, %eax                   /* rsp = top of this cpu's kernel stack */
	inc	%eax
	shl	$KSTACK_SHIFT, %rax
	lea	kstacks(%rip), %rsp
	add	%rax, %rsp
	/* kmain(cpu = esi, mbinfo = edi) */
	xchg	%edi, %esi
	call	kmain
	ud2

/*
 * enter_user(rip, rsp, arg): continue at rip at CPL3. IOPL=3 lets in/out work
 * there on real CPUs and QEMU; PVM drops IOPL on iretq, which is why the TSS
 * also grants our ports in its I/O bitmap (cpu_tables() in guest.c).
 */
	.globl enter_user
enter_user:
	mov	%rdi, %r9
	mov	%rdx, %rdi
	mov	$0x23, %eax
	mov	%ax, %ds
	mov	%ax, %es
	push	$0x23                        /* ss: user data, RPL3 */
	push	%rsi                         /* rsp */
	push	$0x3002                      /* rflags: IOPL=3, IF=0 */
	push	$0x1b                        /* cs: user code, RPL3 */
	push	%r9                          /* rip */
	iretq

/* exception stubs: push a dummy error code where the CPU pushes none */
.macro ISR vec, has_err
	.globl isr\vec
isr\vec:
	.if \has_err == 0
	push	$0
	.endif
	push	$\vec
	jmp	isr_common
.endm
ISR 0,0; ISR 1,0; ISR 2,0; ISR 3,0; ISR 4,0; ISR 5,0; ISR 6,0; ISR 7,0
ISR 8,1; ISR 9,0; ISR 10,1; ISR 11,1; ISR 12,1; ISR 13,1; ISR 14,1; ISR 15,0
ISR 16,0; ISR 17,1; ISR 18,0; ISR 19,0; ISR 20,0; ISR 21,1

isr_common:
	mov	%rsp, %rdi                   /* struct trapframe * */
	call	trap                         /* returns only to a *msr_safe() fixup */
	add	$16, %rsp                    /* vec, err */
	iretq

/*
 * The NESTED_VEC gate (DPL3): N at CPL3 lands here at CPL0 on the kernel
 * stack. l1_enter(rdi = l2_shift) returns rax = the ERR text only if nested
 * mode is unavailable; on success it never returns and the cpu stays at CPL0.
 */
	.globl nested_gate
nested_gate:
	sub	$8, %rsp                     /* the 5-qword frame leaves rsp 8 off the ABI's alignment */
	call	l1_enter
	add	$8, %rsp
	iretq

/* rdmsr_safe(msr, *val) / wrmsr_safe(msr, val) -> 0, or 1 if the access
   faulted (trap() resumes at msr_fault): probing SVM must not kill the guest. */
	.globl rdmsr_safe
rdmsr_safe:
	lea	msr_fault(%rip), %rax
	mov	%rax, fixup_rip(%rip)
	mov	%edi, %ecx
	rdmsr
	shl	$32, %rdx
	or	%rdx, %rax
	mov	%rax, (%rsi)
	xor	%eax, %eax
	movq	$0, fixup_rip(%rip)
	ret
	.globl wrmsr_safe
wrmsr_safe:
	lea	msr_fault(%rip), %rax
	mov	%rax, fixup_rip(%rip)
	mov	%edi, %ecx
	mov	%rsi, %rax
	mov	%rsi, %rdx
	shr	$32, %rdx
	wrmsr
	xor	%eax, %eax
	movq	$0, fixup_rip(%rip)
	ret
msr_fault:
	movq	$0, fixup_rip(%rip)
	mov	$1, %eax
	ret

/*
 * svm_run(vmcb_pa): run L2 until its next #VMEXIT. VMRUN switches only rax,
 * rsp, rip and rflags (they live in the VMCB), so L2's other GPRs are kept
 * in l2_gprs and swapped with ours around it, as the KVM selftests'
 * run_guest() does. No VMLOAD/VMSAVE: L2 never uses FS/GS/TR or the syscall
 * MSRs. GIF is clear after #VMEXIT; STGI puts it back for L1.
 */
.macro SWAP_GPRS
	xchg	%rbx, l2_gprs+0x00(%rip)
	xchg	%rcx, l2_gprs+0x08(%rip)
	xchg	%rdx, l2_gprs+0x10(%rip)
	xchg	%rsi, l2_gprs+0x18(%rip)
	xchg	%rdi, l2_gprs+0x20(%rip)
	xchg	%rbp, l2_gprs+0x28(%rip)
	xchg	%r8,  l2_gprs+0x30(%rip)
	xchg	%r9,  l2_gprs+0x38(%rip)
	xchg	%r10, l2_gprs+0x40(%rip)
	xchg	%r11, l2_gprs+0x48(%rip)
	xchg	%r12, l2_gprs+0x50(%rip)
	xchg	%r13, l2_gprs+0x58(%rip)
	xchg	%r14, l2_gprs+0x60(%rip)
	xchg	%r15, l2_gprs+0x68(%rip)
.endm
	.globl svm_run
svm_run:
	push	%rbx
	push	%rbp
	push	%r12
	push	%r13
	push	%r14
	push	%r15
	mov	%rdi, %rax
	clgi
	SWAP_GPRS
	vmrun	%rax
	SWAP_GPRS
	stgi
	pop	%r15
	pop	%r14
	pop	%r13
	pop	%r12
	pop	%rbp
	pop	%rbx
	ret

	.section .note.GNU-stack, "", @progbits

	.data
	.align 16
	.globl gdt
gdt:
	.quad 0                              /* 0x00 null */
	.quad 0x00af9a000000ffff             /* 0x08 kernel code, 64-bit */
	.quad 0x00cf92000000ffff             /* 0x10 kernel data */
	.quad 0x00affa000000ffff             /* 0x18 user code, 64-bit, DPL3 */
	.quad 0x00cff2000000ffff             /* 0x20 user data, DPL3 */
	.quad 0x00cf9a000000ffff             /* 0x28 kernel code, 32-bit (boot) */
	.globl gdt_tss
gdt_tss:
	.fill 2 * MAX_CPUS, 8, 0             /* 0x30 + 16*cpu: one TSS per cpu */
gdt_end:
	.globl gdt_desc
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

	.bss
	.align 4096
	.globl boot_pml4, boot_pdpt, boot_pd
boot_pml4: .fill 512, 8, 0
boot_pdpt: .fill 512, 8, 0
boot_pd:   .fill 512, 8, 0
	.globl kstacks
kstacks:   .fill MAX_CPUS << KSTACK_SHIFT, 1, 0
l2_gprs:   .fill 14, 8, 0
