/*
 * The kvmsplit ucall protocol, guest side. Lines of ASCII on COM1 (0x3f8),
 * hex numbers without 0x. runner/kvmsplit/vmm/guest/ucall.py is the host side;
 * keep the two in step and bump PROTO_VERSION when a line changes.
 *
 * guest -> host (every line starts with "@<cpu> "):
 *   HELLO <proto> <max_cpus>               BSP, once, at CPL0 after entering long mode
 *   MAPPED <gpa> <size> <shift> <ptpages>  BSP, test region mapped
 *   READY                                  each cpu, now at CPL3 waiting for commands
 *   DONE W <pass> <written>                a write pass finished
 *   DONE R <xor>                           a read pass finished: xor of the first qword of each page
 *   ERR <text>                             a command could not be done
 *   EXC <vec> <err> <rip> <cr2> <cs> <rflags>        an exception; the guest then exits with 0x80|vec
 *   NESTED <l2_shift> <npt_pages>          BSP, now L1 (at CPL0): W/R/F/H run in L2 from here on
 *   DONE F <qword>                         nested: what L2 read at F's gpa
 *   L2EXIT <exitcode> <exitinfo1> <exitinfo2> <l2_rip>   nested: L2 left other than by VMMCALL
 *                                          (SVM exit codes: 400 NPF, 40+vec exception, 7f shutdown,
 *                                          ffffffffffffffff VMRUN refused the VMCB); L1 then answers
 *                                          every command but Q with ERR
 * host -> guest (one line, '\n' terminated):
 *   M <gpa> <size> <shift>                 map the test region with 4K/2M/1G (12/15/1e) pages
 *   W <pass> <pattern> <pct> <seed> <first> <npages> [<how>]   write pass (pattern 0 seq, 1 random);
 *                                          how (WV_*, default 0): bits 0-1 the route: 0 native stores
 *                                          at CPL3, 1 the pass runs at CPL0 (emulated by PVM-style
 *                                          hosts), 2 every store behind the forced-emulation prefix
 *                                          (kvm.force_emulation_prefix); bit 2 (string): each run of
 *                                          up to STRING_PAGES consecutive selected pages a..b is first
 *                                          written by one rep stosq / rep movsq (alternately) over
 *                                          pages a..b-1 whole and b's first qword with STRING_FILL,
 *                                          then the markers.
 *                                          Either way the pages written are the selected ones.
 *   R <first> <npages>                     read pass
 *   H                                      hang forever at CPL3 (tests the runner's timeouts)
 *   Q                                      exit with code 0
 *   N <l2_shift>                           BSP, after READY: become an SVM L1 hypervisor; L2 sees the
 *                                          test region at the same GPAs under NPT pages of 1 << l2_shift
 *                                          (c/15/1e). ERR "svm unavailable: <why>" if the cpu lacks SVM
 *                                          or NPT, other ERRs for a bad shift or no page-table memory
 *   F <gpa>                                nested, a test hook: L2 reads the qword at gpa (L1's page
 *                                          tables map low 1G and the region; the NPT only low memory
 *                                          up to L1's page tables, and the region), answering DONE F
 *                                          or, outside the NPT, L2EXIT 400
 *   X <kind>                               a test hook: misbehave on purpose, never answering (the
 *                                          runner's timeouts and its defences against a broken guest):
 *                                          0 spin at CPL0 (IF=0), 1 random bytes, 2 non-protocol lines,
 *                                          3 one endless line without a newline, 4 triple fault (null IDT
 *                                          at CPL0, then ud2), 5 write half the region then exit 0x7e
 *                                          mid-line, 6 a flood of non-protocol lines, 7 a flood of READY
 *                                          lines nobody asked for; forever, unless it exits. Not nested
 *                                          (L1 answers ERR bad command).
 * In nested mode H spins in L2. exit port 0xf4 (QEMU isa-debug-exit): out <code>.
 */
#define PROTO_VERSION 3
#define COM1 0x3f8
#define EXIT_PORT 0xf4
#define PAGE_SHIFT 12
#define MISBEHAVE_EXIT 0x7e  /* X 5's exit code */
#define MARKER_TAG 0x4b56  /* "KV": marker = TAG<<48 | pass<<32 | page */
#define WV_NATIVE 0        /* W's <how> */
#define WV_CPL0 1
#define WV_FEP 2
#define WV_ROUTE 3
#define WV_STRING 4
#define STRING_PAGES 4     /* at most this many pages per rep-string instruction */
#define STRING_FILL(pass) ((u64)MARKER_TAG << 48 | (pass) << 32 | 0xffffffffUL)  /* what rep writes */
