/*
 * The kvmsplit ucall protocol, guest side. Lines of ASCII on COM1 (0x3f8),
 * hex numbers without 0x. runner/kvmsplit/guest/ucall.py is the host side;
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
 * host -> guest (one line, '\n' terminated):
 *   M <gpa> <size> <shift>                 map the test region with 4K/2M/1G (12/15/1e) pages
 *   W <pass> <pattern> <pct> <seed> <first> <npages>   write pass (pattern 0 seq, 1 random)
 *   R <first> <npages>                     read pass
 *   H                                      hang forever at CPL3 (tests the runner's timeouts)
 *   Q                                      exit with code 0
 * exit port 0xf4 (QEMU isa-debug-exit): out <code>.
 */
#define PROTO_VERSION 1
#define COM1 0x3f8
#define EXIT_PORT 0xf4
#define PAGE_SHIFT 12
#define MARKER_TAG 0x4b56  /* "KV": marker = TAG<<48 | pass<<32 | page */
