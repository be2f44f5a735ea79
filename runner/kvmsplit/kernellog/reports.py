"""Kernel reports (WARNING, BUG, KASAN, lockdep, stalls, panics) found in log records.

Modelled on syzkaller's pkg/report (linux.go): a table of report types, each
with a start pattern, a title format and a rule for choosing the stack frame
that names the bug, skipping generic frames (__warn, dump_stack, kasan_report,
lock_acquire...). Titles follow syzkaller's conventions, so they can be
compared with syzbot's: `WARNING in kvm_mmu_find_shadow_page`,
`KASAN: slab-use-after-free Read in kvm_tdp_mmu_invalidate_all_roots`.
"""
from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from kvmsplit.kernellog.records import Record

_FN = r"[A-Za-z_]\w*"                 # a C identifier
_SRC = r"[\w./-]+\.[A-Za-z]+"         # a source path, with its extension


class Frame(StrEnum):
    """How a report type picks the frame its title names: the first of its
    candidates that is not generic (report machinery, allocators, locking)."""
    STACK = "stack"     # the header's function, the kernel RIP, then the call trace
    STALL = "stall"     # the code the stall interrupted, up to the syscall or worker that looped
    ANCHOR = "anchor"   # the first trace's frame just above the syscall or worker entry (overflows)
    HANG = "hang"       # the blocked task, grouped by what it waits for
    LOCK = "lock"       # lockdep's `at:` lines, then the trace
    NONE = "none"       # the title names no frame

    def candidates(self, header_fn: str | None, st: _Stack) -> list[str]:
        if self is Frame.STALL:
            return _stalled(st)
        if self in (Frame.HANG, Frame.ANCHOR):
            return st.first
        if self is Frame.LOCK:
            return st.at + st.first
        return ([header_fn] if header_fn else []) + st.rips + st.first

    def pick(self, frames: list[str]) -> str | None:
        if self in (Frame.STALL, Frame.ANCHOR):
            return _stall_frame(frames)
        if self is Frame.HANG:
            return _hang_frame(frames)
        return frames[0] if frames else None


class Attach(StrEnum):
    """What a report's header line does while another report is open."""
    NEW = "new"     # starts its own report
    OPEN = "open"   # is part of the open report (the `invalid opcode` line of a BUG)
    LAST = "last"   # also rejoins the previous one when none is open (`Kernel panic - not
                    # syncing: Fatal exception` after an oops's end marker)


@dataclass(frozen=True)
class ReportType:
    """One row of the table.

    start    is searched in each (left-stripped) log line; its named groups feed
             the title: `fn` is the function the header names, `file`/`line`
             where the kernel says it fired, anything else (kind, msg...) is
             used by name in `title`.
    title    a format string; {func} is the frame chosen by `frame`.
    frame    how that frame is chosen (Frame).
    skip     generic frames for this type on top of the common list.
    attach   what the line does while another report is open (Attach).
    detail   searched in the lines after the start for more title fields.
    """
    name: str
    start: re.Pattern
    title: str
    frame: Frame = Frame.STACK
    skip: tuple[str, ...] = ()
    attach: Attach = Attach.NEW
    detail: re.Pattern | None = None


def _row(name: str, start: str, title: str, detail: str | None = None, **kw) -> ReportType:
    return ReportType(name, re.compile(start), title,
                      detail=re.compile(detail) if detail else None, **kw)


def _warning(path: str = _SRC, fn: str = _FN) -> str:
    """The header __warn() prints, restricted to a source path and a function.

    Forms: `WARNING: CPU: 3 PID: 77 at FILE:LINE FN+0x9a/0x1c0` (since 2.6.3x),
    `WARNING: at FILE:LINE FN+...()` (older) and `WARNING: FILE:LINE at 0x0,
    CPU#1: comm/pid` (2025 rework). Notices such as `Speculative Return Stack
    Overflow: WARNING: See https://...` have no FILE:LINE and do not match.
    """
    optional = "?" if fn == _FN else ""      # a row that names the function needs it
    return (rf"^WARNING: (?:CPU: \d+ (?:UID: \d+ )?PID: \d+ at |at |\[[^\]]*\] )?"
            rf"(?P<file>{path}):(?P<line>\d+)\b(?:\s+(?:at\s+)?(?P<fn>{fn})(?=[+.(]|$)){optional}")


_KVM_SOURCE = r"(?:arch/[\w-]+/kvm|virt/kvm)/[\w./-]+\.[ch]"
_LOCKDEP_SKIP = ("process_one_work", "flush_workqueue", "drain_workqueue", "destroy_workqueue")
_OVERFLOW_SKIP = ("^asm_exc", "exc_double_fault", "handle_stack_overflow", "^irq_")    # the overflow's own path

# First match wins, so specific rows come before general ones.
REPORT_TYPES: tuple[ReportType, ...] = (
    # WARN_ON() and friends: __warn() output.
    _row("WARNING", _warning(r"lib/refcount\.c"), "WARNING: refcount bug in {func}",
         skip=("refcount", "kobject_")),
    _row("WARNING", _warning(r"lib/debugobjects\.c"), "WARNING: ODEBUG bug in {func}",
         skip=("debug_", "rcu", "hrtimer_", "timer_", "work_", "percpu_", "vunmap", "vfree",
               "__free_", "kobject_")),
    _row("WARNING", _warning(r"kernel/locking/lockdep\.c", r"\w*lock_\w*"),
         "WARNING: locking bug in {func}", skip=("lock_sock", "release_sock")),
    _row("WARNING", _warning(r"mm/(?:slab_common|util)\.c", r"(?:kmalloc_slab|kvmalloc_node\w*|"
                             r"__kvmalloc_node\w*|kmalloc_fix_flags)"),
         "WARNING: kmalloc bug in {func}", skip=("kvmalloc", "kvzalloc", "kvcalloc", "kmalloc_array")),
    _row("WARNING", _warning(r"mm/vmalloc\.c", r"__vmalloc_node_range\w*"),
         "WARNING: zero-size vmalloc in {func}", skip=("vmalloc", "vzalloc", "vmemdup", "kvmalloc")),
    _row("WARNING", _warning(r"fs/proc/generic\.c", r"proc_register\w*"),
         "WARNING: proc registration bug in {func}", skip=("proc_", "^proc")),
    _row("WARNING", _warning(r"lib/kobject\.c", r"kobject_add_internal\w*"),
         "WARNING: kobject bug in {func}", skip=("kobject_",)),
    _row("WARNING", _warning(r"mm/usercopy\.c"), "WARNING: bad usercopy in {func}",
         skip=("usercopy", "__check", "check_")),
    _row("WARNING", _warning(r"drivers/usb/core/urb\.c", r"usb_submit_urb\w*"),
         "WARNING in {func}/usb_submit_urb", skip=("^usb_",)),
    # A WARN in KVM's own source: KVM_BUG_ON() and the MMU's sanity checks land here.
    _row("KVM_WARN", _warning(_KVM_SOURCE), "WARNING in {func}"),
    _row("WARNING", _warning(), "WARNING in {func}"),
    # Sanitizers. KMSAN, KCSAN and KFENCE print `BUG: ` before their name; syzbot's titles drop it.
    _row("KMSAN", rf"BUG: KMSAN: (?P<kind>[\w-]+) in (?P<fn>{_FN})", "KMSAN: {kind} in {func}",
         skip=("kmsan", "__msan", "copy_to_user", "_copy_to_iter", "copyout", "usb_submit_urb")),
    _row("KCSAN", rf"BUG: KCSAN: (?P<kind>data-race|assert: race) in (?P<fns>{_FN}(?:\S*)"
         rf"(?: / {_FN}\S*)?)", "KCSAN: {kind} in {fns}", frame=Frame.NONE),
    _row("KCSAN", r"BUG: KCSAN: (?P<kind>[\w:-]+(?: [\w-]+)?) in ", "KCSAN: {kind} in {func}",
         skip=("kcsan",)),
    _row("KFENCE", rf"BUG: KFENCE: (?P<kind>[a-z-]+(?: (?:read|write|corruption|free))?) in "
         rf"(?P<fn>{_FN})", "KFENCE: {kind} in {func}", skip=("kfence",)),
    _row("KASAN", r"BUG: KASAN: (?:double-free or invalid-free|double-free|invalid-free) "
         rf"in (?P<fn>{_FN})", "KASAN: invalid-free in {func}",
         skip=("slab_", "kfree", "vunmap", "vfree")),
    _row("KASAN", rf"BUG: KASAN: (?P<kind>[a-z-]+) in (?P<fn>{_FN})",
         "KASAN: {kind} {access} in {func}", detail=r"(?P<access>Read|Write) (?:of size|at addr)"),
    _row("UBSAN", rf"UBSAN: Undefined behaviour in (?P<file>{_SRC}):(?P<line>\d+)",
         "UBSAN: undefined-behaviour in {func}", skip=("ubsan", "overflow")),
    _row("UBSAN", rf"UBSAN: (?P<kind>[\w-]+) in (?P<file>{_SRC}):(?P<line>\d+)",
         "UBSAN: {kind} in {func}", skip=("ubsan", "overflow")),
    # BUG: lines.
    _row("BUG", r"BUG: (?:unable to handle kernel paging request|unable to handle page fault for "
         r"address|Unable to handle kernel data access)",
         "BUG: unable to handle kernel paging request in {func}"),
    _row("BUG", r"BUG: (?:unable to handle kernel NULL pointer dereference|kernel NULL pointer "
         r"dereference|Kernel NULL pointer dereference)",
         "BUG: unable to handle kernel NULL pointer dereference in {func}"),
    _row("BUG", r"^Unable to handle kernel (?P<kind>paging request|NULL pointer dereference|access "
         r"to user memory)", "BUG: unable to handle kernel {kind} in {func}"),
    _row("SOFT_LOCKUP", r"BUG: soft lockup", "BUG: soft lockup in {func}", frame=Frame.STALL),
    _row("BUG", r"BUG: (?P<kind>spinlock|rwlock) (?P<what>lockup suspected|already unlocked|"
         r"recursion|cpu recursion|bad magic|wrong owner|wrong CPU)",
         "BUG: {kind} {what} in {func}", skip=("spin_", "_lock", "_unlock")),
    _row("BUG", r"BUG: scheduling while atomic", "BUG: scheduling while atomic in {func}",
         skip=("schedule",)),
    _row("BUG", rf"BUG: sleeping function called from invalid context at (?P<file>{_SRC}):(?P<line>\d+)",
         "BUG: sleeping function called from invalid context in {func}"),
    _row("BUG", r"BUG: using (?P<what>\w+)\(\) in preemptible",
         "BUG: using {what}() in preemptible code in {func}",
         skip=("preempt", "debug_", "processor_id", "this_cpu")),
    _row("LEAK", r"(?:^|\s)BUG: memory leak$", "memory leak in {func}",
         skip=("kmemleak", "alloc", "slab", "^kstrn?dup", "^kmemdup", "^kvmemdup", "^kstrdup",
               "create_object", "^__do_kmalloc", "^__kmalloc", "^kmalloc", "^kzalloc", "^kcalloc",
               "^krealloc", "^vzalloc", "^vmalloc", "__vmalloc", "^kvmalloc", "^kvzalloc",
               "^__kvmalloc", "mempool", "^idr_get", "^ida_", "^kobject_", "^kset_",
               "__alloc_skb", "^alloc_skb", "^sock_alloc_send", "^sk_prot_alloc", "^getname",
               "^sk_alloc", "kasprintf", "pcpu_", "alloc_percpu", "kobject_set_name", "list_lru",
               "^kmem_", "^mempool_", "^dst_alloc", "^neigh_alloc", "^kvasprintf", "^kstrdup_const")),
    _row("BUG", r"BUG: workqueue lockup\b", "BUG: workqueue lockup", frame=Frame.NONE),
    _row("BUG", r"BUG: workqueue leaked lock or atomic", "BUG: workqueue leaked lock or atomic in {func}",
         skip=("process_one_work", "worker_thread"), detail=rf"last function: (?P<fn>{_FN})"),
    _row("BUG", r"BUG: (?:TASK |IRQ |\w+ )?stack guard page was hit", "BUG: stack guard page was hit "
         "in {func}", frame=Frame.ANCHOR, skip=(*_OVERFLOW_SKIP, "_irq$")),
    _row("BUG", r"BUG: Dentry .{0,80}still in use .*\[unmount of ", "BUG: Dentry still in use in unmount",
         frame=Frame.NONE),
    _row("BUG", r"BUG: Bad page state in process", "BUG: Bad page state in {func}",
         skip=("bad_page", "free_page", "free_pages", "free_unref", "free_pcp", "page_frag",
               "put_page", "free_compound", "^__folio_put", "^folio_put", "release_pages",
               "free_the_page", "check_free_page", "free_page_is_bad", "destroy_large_folio",
               "__put_", "page_pool")),
    _row("BUG", r"BUG: Bad rss-counter state", "BUG: Bad rss-counter state", frame=Frame.NONE),
    _row("BUG", r"BUG: Bad page (?P<what>map|cache)", "BUG: Bad page {what} in {func}",
         skip=("print_bad_pte", "zap_", "unmap_")),
    _row("BUG", r"BUG: non-zero pgtables_bytes on freeing mm", "BUG: non-zero pgtables_bytes on "
         "freeing mm", frame=Frame.NONE),
    _row("BUG", r"BUG: KASAN: (?P<kind>[a-z-]+) ", "KASAN: {kind} in {func}"),
    # Lockdep's bracketed headers (kernels before 4.15): `[ BUG: bad unlock balance detected! ]`.
    _row("LOCKDEP", r"^\[ BUG: (?P<what>bad unlock balance) detected", "BUG: {what} in {func}",
         skip=_LOCKDEP_SKIP),
    _row("LOCKDEP", r"^\[ BUG: (?:\S+ )?(?P<what>bad unlock balance|held lock freed|lock held when "
         r"returning to user space|still has locks held|bad contention|nested lock was not taken)\b",
         "BUG: {what} in {func}", frame=Frame.LOCK, skip=_LOCKDEP_SKIP),
    _row("LOCKDEP", r"^\[ INFO: (?:possible circular locking dependency|possible recursive "
         r"locking|possible irq lock inversion dependency|\S+-safe -> \S+-unsafe lock order) detected",
         "possible deadlock in {func}", frame=Frame.LOCK, skip=_LOCKDEP_SKIP),
    _row("LOCKDEP", r"^\[ INFO: inconsistent lock state \]", "inconsistent lock state in {func}",
         frame=Frame.LOCK),
    _row("LOCKDEP", r"^\[ (?P<level>INFO|WARNING): suspicious RCU usage", "{level}: suspicious RCU usage in {func}",
         skip=("rcu", "kmem", "slab"), detail=rf"^(?P<file>{_SRC}):(?P<line>\d+) "),
    _row("LOCKDEP", r"^WARNING: Nested lock was not taken", "WARNING: nested lock was not taken in {func}",
         frame=Frame.LOCK),
    _row("LOCKDEP", r"INFO: trying to register non-static key",
         "INFO: trying to register non-static key in {func}", skip=("register_lock_class",
                                                                    "^assign_lock_key")),
    # With hashed pointers, `(ptrval)`, syzbot merged the two.
    _row("BUG", r"^WARNING: kernel stack (?:regs|frame pointer) at\s+\(ptrval\) .* has bad ",
         "WARNING: kernel stack regs has bad value", frame=Frame.NONE),
    _row("BUG", r"^WARNING: kernel stack regs at .* has bad '(?P<reg>\w+)' value",
         "WARNING: kernel stack regs has bad '{reg}' value", frame=Frame.NONE),
    _row("BUG", r"^WARNING: kernel stack frame pointer at .* has bad value",
         "WARNING: kernel stack frame pointer has bad value", frame=Frame.NONE),
    _row("LOCKDEP", r"^\[ BUG: Invalid wait context \]|^BUG: Invalid wait context",
         "WARNING: locking bug in {func}", skip=_LOCKDEP_SKIP),
    # SLUB debugging: `BUG kmalloc-8 (Tainted: G B): Object already free`, then its track lines.
    _row("BUG", r"^BUG [\w-]+ \(.*\): (?P<msg>\S.*)", "BUG: {msg}", frame=Frame.NONE),
    _row("BUG", rf"^INFO: (?P<what>Allocated|Freed) in (?P<fn>{_FN})", "INFO: {what} in {func}"),
    # Any other BUG: the kernel's own words are the title.
    _row("BUG", r"(?:^|: )BUG: (?P<msg>\S.*)", "BUG: {msg}", frame=Frame.NONE),
    # BUG_ON(): `kernel BUG at FILE:LINE!` then `invalid opcode`.
    _row("KERNEL_BUG", r"kernel BUG at (?P<file>mm/usercopy\.c):(?P<line>\d+)",
         "BUG: bad usercopy in {func}", skip=("usercopy", "__check")),
    _row("KERNEL_BUG", r"kernel BUG at (?P<file>lib/list_debug\.c):(?P<line>\d+)",
         "BUG: corrupted list in {func}"),
    _row("KERNEL_BUG", rf"kernel BUG at (?P<file>{_SRC}):(?P<line>\d+)", "kernel BUG in {func}",
         skip=("^skb_",)),
    # Oopses. A user-space `traps: ... general protection fault ... error:0 in libc` is not one.
    _row("GPF", r"general protection fault(?!.*\berror:\d+ in )", "general protection fault in {func}"),
    _row("OOPS", r"stack segment: ", "stack segment fault in {func}"),
    _row("OOPS", r"PANIC: double fault", "PANIC: double fault in {func}", attach=Attach.OPEN),
    _row("OOPS", r"divide(?: |_)error: ", "divide error in {func}"),
    _row("OOPS", r"^(?:Oops: )?int3: ", "int3 in {func}", attach=Attach.OPEN),
    _row("OOPS", r"invalid opcode: ", "invalid opcode in {func}", attach=Attach.OPEN),
    _row("OOPS", r"(?:^|Internal error: )Oops(?: - \w+)?: ", "Oops in {func}", attach=Attach.OPEN),
    # arm64 and 32-bit ARM.
    _row("OOPS", r"^Internal error: (?!Oops: )", "Internal error in {func}", attach=Attach.OPEN),
    _row("OOPS", r"^Unhandled fault: ", "Unhandled fault in {func}"),
    # Lockdep.
    _row("LOCKDEP", r"(?:WARNING|INFO): (?:possible circular locking dependency|possible recursive "
         r"locking|possible irq lock inversion dependency|\S+-safe -> \S+-unsafe lock order) detected",
         "possible deadlock in {func}", frame=Frame.LOCK, skip=_LOCKDEP_SKIP),
    _row("LOCKDEP", r"(?:WARNING|INFO): inconsistent lock state", "inconsistent lock state in {func}"),
    _row("LOCKDEP", r"WARNING: (?P<what>bad unlock balance) detected", "WARNING: {what} in {func}",
         skip=_LOCKDEP_SKIP),
    _row("LOCKDEP", r"WARNING: (?:\S+ )?(?P<what>bad unlock balance|held lock freed|lock held when "
         r"returning to user space|still has locks held)", "WARNING: {what} in {func}", frame=Frame.LOCK),
    _row("LOCKDEP", r"(?P<level>WARNING|INFO): suspicious RCU usage",
         "{level}: suspicious RCU usage in {func}", skip=("rcu", "kmem", "slab"),
         detail=rf"^(?P<file>{_SRC}):(?P<line>\d+) "),
    # Stalls and hangs.
    _row("RCU_STALL", r"rcu_(?:preempt|sched|bh|tasks)\w* (?:self-)?detected(?: expedited)? stall",
         "INFO: rcu detected stall in {func}", frame=Frame.STALL, skip=("apic_timer_interrupt", "rcu")),
    _row("HARD_LOCKUP", r"Watchdog detected hard LOCKUP on cpu", "watchdog: hard LOCKUP in {func}",
         frame=Frame.STALL),
    _row("HUNG_TASK", r"INFO: task .{0,100}? blocked (?:in I/O wait )?for more than \d+ seconds",
         "INFO: task hung in {func}", frame=Frame.HANG),
    _row("HUNG_TASK", r"INFO: task .{0,100}? can't die for more than \d+ seconds",
         "INFO: task can't die in {func}", frame=Frame.HANG),
    _row("BUG", r"unregister_netdevice: waiting for (?P<dev>\w+?)\d* to become free",
         "unregister_netdevice: waiting for DEV to become free", frame=Frame.NONE, attach=Attach.OPEN),
    _row("BUG", r"^VFS: Close: file count is 0$", "VFS: Close: file count is zero (use-after-free)",
         frame=Frame.NONE),
    _row("BUG", r"^VFS: Busy inodes after unmount of ", "VFS: Busy inodes after unmount (use-after-free)",
         frame=Frame.NONE),
    # Panics. Most follow another report and say only that it was fatal.
    _row("PANIC", r"Kernel panic - not syncing: (?P<msg>Fatal exception.*|.*panic_on_\w+ set.*|"
         r"hung_task: blocked tasks|softlockup: hung tasks|Hard LOCKUP|Machine halted\.?)$",
         "kernel panic: {msg}", frame=Frame.NONE, attach=Attach.LAST),
    _row("PANIC", r"Kernel panic - not syncing: stack-protector: Kernel stack is corrupted in: "
         rf"(?:(?P<fn>{_FN})\+0x|[0-9a-f]+)", "kernel panic: stack is corrupted in {func}", attach=Attach.OPEN,
         skip=("__stack_chk_fail", "stack_chk")),
    _row("PANIC", r"Kernel panic - not syncing: corrupted stack end detected inside scheduler",
         "kernel panic: corrupted stack end in {func}", attach=Attach.OPEN, frame=Frame.ANCHOR),
    _row("PANIC", r"Kernel panic - not syncing: kernel stack overflow", "kernel stack overflow in {func}",
         attach=Attach.OPEN, frame=Frame.ANCHOR, skip=_OVERFLOW_SKIP),
    _row("PANIC", r"Kernel panic - not syncing: Attempted to kill init!",
         "kernel panic: Attempted to kill init!", frame=Frame.NONE, attach=Attach.OPEN),
    _row("PANIC", r"Kernel panic - not syncing: (?P<msg>.*)", "kernel panic: {msg}", frame=Frame.NONE,
         attach=Attach.OPEN),
)

# Frames that never name a bug: report machinery, allocators, locking and
# string primitives. A compact version of syzkaller's skipPatterns.
_GENERIC_FRAMES = (
    "__sanitizer", "__asan", "kasan", "kmsan", "kcsan_setup_watchpoint", "check_memory_region",
    "check_heap_object", "check_object", "print_address_description", "print_report",
    "panic", "invalid_op", "report_bug", "fixup_bug", "handle_bug", "do_error", "_trap$|do_trap",
    "show_stack", "show_regs", "dump_stack", "dump_backtrace", "warn_slowpath", "warn_bogus",
    "__warn", "print_tainted",
    "alloc_page", "k?v?(?:m|z|c)alloc", "krealloc", "kmem_cache", "allocate_slab", "slab_",
    "^kv?free$",
    "lockdep", "lock_acquire", "lock_release", "lock_class", "mark_lock", "(?:reacquire|mark)_held_locks",
    "spin_lock", "spin_trylock", "spin_unlock", "(?:read|write)_(?:try)?lock", "(?:read|write)_unlock",
    "^down$", "down_(?:read|write)", "up_(?:read|write)", "^mutex_", "^__mutex_", "^rt_mutex_",
    "osq_(?:un)?lock", "bh_(?:en|dis)able",
    "atomic(?:64)?_(?:dec|inc|read|set|or|xor|and|add|sub|fetch|xchg|cmpxchg|try)",
    "(?:set|clear|change|test)_bit", "^refcount_", "^kref_", "ref_tracker",
    "mem(?:cpy|cmp|set|chr|move|dup)", "str(?:n?cmp|n?cpy|lcpy|scpy|n?len|n?str|chr|n?dup)",
    "copy_(?:to|from)_(?:user|iter)", "(?:put|get)_user", "might_fault", "might_sleep",
    "__might_resched",
    "list_(?:add|del|replace|move|splice)", "^rb_", "^__rb_", "_indirect_thunk_",
    "printk", "snprintf", "va_format", "^dev_(?:info|notice|warn|err|alert|crit|emerg)",
    "string", "pointer", "^crc\\d+", "hex_dump",
    "debug_object", "__wake_up", "^complete$", "wait_for_completion", "finish_wait", "flush_work",
    "__cancel_work_timer", "try_to_grab_pending", "cancel_work_sync", "queue_work",
    "(?:flush|drain|destroy)_workqueue", "kthread_stop", "lock_timer_base", "__mod_timer",
    "del_timer", "__timer_delete_sync",
    "kobject_", "^device_(?:add|del|unregister|release|destroy)$", "sysfs_remove", "^put_device$",
    "^(?:un)?lock_page", "folio_(?:alloc|unlock)", "filemap_alloc_folio", "__filemap_get_folio",
    "do_read_cache_folio", "read_cache_page", "xas_(?:start|load|find)", "assertfail",
    "(?:trace|lockdep)_(?:hard|soft)irq", "cleanup_srcu_struct", "__phys_addr",
    "stack_trace_save", "arch_stack_walk", "do_(?:kernel|translation)_fault", "do_mem_abort",
    "el1_abort", "el1h_64_sync",
    # More report machinery, per sanitizer and arch.
    "hwasan", "__msan", "kcsan", "kfence", "check_preemption_disabled", "debug_smp_processor_id",
    "read_word_at_a_time", "(?:read|write)_once_\\w*nocheck", "print_usage_bug", "print_\\w+_bug$",
    "print_unlock_imbalance", "check_noncircular", "check_prev_add", "validate_chain",
    "check_irq_usage", "check_usage", "valid_state", "lock_downgrade", "lock_is_held",
    "walk_stackframe", "unwind_backtrace", "__dump_stack", "show_trace", "warn_alloc",
    "__might_fault", "raw_spin_rq", "owner_on_cpu", "timer_is_static_object",
    "work_is_static_object", "seqprop_assert", "__fortify", "fortify_", "stack_trace_consume_entry",
    "stack_depot", "^nmi_", "arch_trigger_cpumask", "^trigger_\\w+_backtrace",
    "do_trap_break", "do_debug_exception", "bad_mode", "^el1_", "^el0_sync", "^do_bad_area",
    "program_check", "^__do_user_fault", "^do_page_fault$", "^exc_page_fault$", "handle_page_fault",
    "asm_exc_", "^exc_(?:int3|invalid_op|general_protection|debug)", "^do_int3",
    # Allocators, copies, strings, printing.
    "^__?alloc_pages", "^alloc_pages", "^__get_free_pages", "^get_zeroed_page", "kmemdup",
    "^kstrn?dup", "^vzalloc", "^__vmalloc", "^vmalloc", "^kvmalloc", "^kvzalloc", "^kvcalloc",
    "^kfree_sensitive$", "^kzfree$", "^kfree_rcu", "^__kfree_skb", "^kfree_skb", "^skb_release",
    "^skb_queue_purge", "^consume_skb", "^__folio_put", "^put_page$",
    "^copy_page_(?:to|from)_iter", "^copy_folio_to_iter", "^_copy_(?:to|from)_(?:user|iter)",
    "^copyin$", "^copyout$", "strscpy", "^strlcat", "^strncat", "^strcat", "^strsep", "^strpbrk",
    "^strim$", "^kstrto", "^simple_strto", "^sscanf", "^vsscanf", "^scnprintf", "^vscnprintf",
    "^kvasprintf", "^kasprintf", "^sprintf$", "^vsprintf", "^vprintk", "^_printk", "^__printk",
    "^dev_printk", "^__dev_printk", "^dev_vprintk", "^netdev_(?:info|warn|err|printk)",
    "^__netdev_printk", "^hex_string", "^number$", "^put_dec", "^format_decode",
    "^bitmap_", "^find_(?:next|first)_(?:zero_)?bit", "^_find_(?:next|first)_bit", "^__bitmap",
    "^crc_itu_t", "^crc16", "^crc32", "^jhash", "^siphash", "^memscan", "^__memcpy", "^__memset",
    "^__memmove", "^sized_strscpy",
    # Locking, waiting, RCU, timers, work.
    "^_raw_", "^__raw_", "^do_raw_", "^queued_(?:spin|read|write)_", "^native_queued_spin",
    "^__pv_queued", "^rwsem_", "^__rwsem", "^percpu_(?:down|up)_", "^percpu_ref_",
    "^__percpu_(?:down|up)", "^down_trylock", "^__down", "^__up", "^up$", "^ww_mutex",
    "^__ww_mutex", "^rcu_read_(?:un)?lock", "^__rcu_read", "^srcu_read", "^__srcu_read",
    "^__wait_for_common",
    "^wait_for_common", "^do_wait_for_common", "^schedule_timeout", "^prepare_to_wait",
    "^__queue_work", "^queue_work_on", "^queue_delayed_work", "^mod_delayed_work",
    "^__queue_delayed_work", "^cancel_delayed_work", "^__flush_work", "^__cancel_work",
    "^timer_delete", "^try_to_del_timer", "^__try_to_del_timer", "^del_timer_sync",
    "^hrtimer_cancel", "^hrtimer_try_to_cancel", "^__hrtimer_start", "^hrtimer_start",
    "^call_rcu", "^__call_rcu", "^kvfree_call_rcu", "^rcu_barrier",
    # Device model and other registries that only carry the caller's bug.
    "^device_(?:add|del|unregister|release|destroy|create|register|for_each_child|"
    "remove_file|create_file)", "^get_device_parent", "^add_uevent_var", "^kobject_uevent",
    "^devres_release", "^devm_", "^hwrng_unregister", "^i2c_del_adapter", "^__unregister_client",
    "^i2c_unregister_device", "^rollback_registered", "^unregister_netdevice", "^unregister_netdev$",
    "^debugfs_", "^proc_create", "^remove_proc", "^device_remove",
    "^usb_kill_urb", "^usb_kill_anchored_urbs", "^usb_poison_urb", "^usb_submit_urb",
    "^usb_start_wait_urb", "^usb_bulk_msg", "^usb_control_msg", "^usb_interrupt_msg",
    "^usb_deregister", "^usb_register", "^tty_unregister_device", "^tty_register_device",
    "^ida_(?:alloc|free|simple|remove)", "^idr_(?:alloc|remove|find|get)", "^xa_", "^__xa_",
    "^klist_", "^bus_(?:add|remove)_", "^driver_(?:register|unregister)", "^ref_tracker",
    "^kref_put", "^kobject_put", "^put_device", "^get_device",
    "^fput$", "^fput_many", "^__fput_sync", "^dput$", "^iput$", "^mntput", "^path_put",
    "^nlmsg_", "^netlink_(?:unicast|broadcast)", "^skb_put", "^skb_(?:push|pull|copy|clone)",
    "^rhashtable_", "^__rhashtable", "^rht_", "^sock_(?:hold|put)$", "^__sock_put", "^sk_free$",
    "^__sk_free", "^sock_wfree", "^kthread_(?:stop|park|create)", "^__kthread_create",
    "^perf_trace_", "^trace_event_raw_event", "^__traceiter", "^__trace_", "^trace_",
    "^__bpf_trace", "^bpf_trace_run", "^should_fail", "do_tag_check_fault", "^__do_kernel_fault",
    "^logic_(?:in|out)", "^__raw_(?:read|write)[bwlq]$", "__virt_to_phys", "^_dev_(?:info|notice|warn|err)",
    "^__should_fail", "^fail_dump", "^should_failslab", "^__should_failslab",
    "^__sanitizer_cov", "^entry_SYSCALL", "^__alloc_frozen_pages", "alloc_frozen_pages",
    "fast_dput", "^dput", "^(?:drop|clear|inc|set)_nlink$", "^mark_buffer_dirty$", "^folios_put",
    "^skb_free_head", "^sk_skb_reason_drop", "^sk_stop_timer",
    "^crypto_", "^aes_", "^aesti_", "^(?:xts|ecb|cbc|ctr|gcm)_(?:en|de)crypt", "^skcipher_",
    "^write_comp_data", "^__kasan", "^kasan",
)

# Syscall wrappers differ by arch and version; the title uses the bare name.
_STRIP_PREFIXES = ("SYSC_", "SyS_", "sys_", "__x64_", "__ia32_", "__arm64_", "____sys_", "___sys_",
                   "__sys_", "__se_", "__se_sys_", "__do_sys_", "compat_SYSC_", "compat_SyS_", "ksys_")

# Stalls: the looping code shows up at a random depth; the frame just above
# the syscall or worker entry identifies it (syzkaller's linuxStallAnchorFrames).
_STALL_ANCHORS = re.compile("|".join((
    "process_one_work", "do_syscall_", "do_fast_syscall_", "sysenter_dispatch", "el0_svc_handler",
    "invoke_syscall", "ret_fast_syscall", "netif_receive_skb", "do_softirq", "call_timer_fn",
    "_run_timers", "run_timer_softirq", "hrtimer_run", "run_ksoftirqd", "smpboot_thread_fn",
    "^kthread$", "start_secondary", "cpu_startup_entry", "ret_from_fork", "vfs_write", "vfs_read",
    "vfs_iter_read", "vfs_iter_write", "new_sync_read", "new_sync_write", "vfs_ioctl",
    "ksys_ioctl", "compat_ioctl", "compat_sys_ioctl", "do_iter_readv_writev", "^call_mmap",
    "mmap_region", "do_mmap", "do_dentry_open", "vfs_open", "^sock_sendmsg", "^sock_recvmsg",
    r"^(?:sys_)?(?:socketpair|connect|ioctl)", "__do_fault", "do_page_fault", "^page_fault$",
    "__fput", "task_work_run", "exit_to_usermode", "smp_call_function", "tasklet_action",
    "^rtnetlink_rcv_msg", "^nfnetlink_rcv_msg", "^netlink_rcv_skb", "^genl_rcv_msg", "^genl_family_rcv",
    "^__do_softirq", "^handle_softirqs")))

# Hung tasks: they block wherever the real culprit left them; group the common
# culprits, otherwise take the first frame that is not waiting machinery.
_HANG_ANCHORS = {"rtnl_lock": "rtnl_lock", "synchronize_rcu": "synchronize_rcu",
                 "synchronize_srcu": "synchronize_rcu", "synchronize_net": "synchronize_rcu",
                 "synchronize_sched": "synchronize_rcu"}
_HANG_SKIP = ("sched", "_lock", "_slowlock", "down", "rwsem", "completion", "kthread", "wait",
              "synchronize", "context_switch", "__switch_to", "cancel_delayed_work", "rcu_barrier")

_CUT_HERE = re.compile(r"-+\[ cut here \]-+")
_RULER = re.compile(r"^={20,}$")                 # KASAN, UBSAN and lockdep frame reports with it
_END = re.compile(r"---\[ end (?:trace|Kernel panic)")
_PREAMBLE_REACH = 3     # lines a WARN message may take between `cut here` and `WARNING:`

# Old kernels glue `Call Trace:` to the line before (`dffffc0000000000Call Trace:`); kmemleak
# says `backtrace:`, 32-bit ARM `Backtrace:` or nothing (`[<pc>] (fn) from [<lr>]` lines).
_TRACE_START = re.compile(r"(?:^|\S)\s*Call [Tt]race:|^\s*[Bb]acktrace(?: \(crc [0-9a-f]+\))?:?$")
_TRACE_END = re.compile(
    r"^\s*(?:</TASK>|---\[ end |Allocated by task|Freed by task|Last potentially "
    r"related|Second to last potentially|The buggy address|Memory state around|Showing all locks "
    r"held|NMI backtrace for|Sending NMI|Kernel Offset:|Modules linked in:|Kernel panic - not syncing)")
# The frame where a timer interrupt entered: below it is the code it interrupted.
_IRQ_ENTRY = re.compile(r"apic_timer_interrupt$|^__irq_svc$|^el1_irq$|^el1h_64_irq$|^gic_handle_irq$")
_IRQ_END = re.compile(r"^\s*(?:</IRQ>|<EOI>)")
# ` func+0x1a/0x40 [mod]`, ` [<ffffffff81234567>] func+0x1a/0x40`, symbolized
# ` func+0x1a/0x40 arch/x86/kvm/x86.c:12` and decoded ` func (arch/x86/kvm/x86.c:12)`.
# Symbolized `func file:line [inline]` lines are the inlined callers, frames too (syzbot names them).
_FRAME = re.compile(r"^\s*(?:<(?:IRQ|EOI|NMI)>\s*)?(?:\[<?(?:0x)?[0-9a-f]+>?\]\s*){0,2}(?P<unreliable>\?\s+)?"
                    r"(?P<name>[A-Za-z_][\w.]*)(?:\+0x[0-9a-f]+/0x[0-9a-f]+|\s+\([^()]*\.\w+:\d+"
                    r"|\s+[\w./-]+\.\w+:\d+(?::\d+)? \[inline\])")
# 32-bit ARM: `[<8011218c>] (unwind_backtrace) from [<8010e300>] (show_stack+0x18/0x1c)`.
_ARM_FRAME = re.compile(r"^\s*\[<[0-9a-f]+>\] \((?P<name>[A-Za-z_][\w.]*)(?:\+0x[0-9a-f]+/0x[0-9a-f]+)?"
                        r"(?: \[\w+\])?\) from \[<[0-9a-f]+>\] \((?P<caller>[A-Za-z_][\w.]*)")
_RIP = re.compile(r"(?:\b(?:RIP|EIP|NIP|PC is at)|^pc)\s*:?\s*(?:[0-9a-f]{4}:)?(?:\[<?[0-9a-f]+>?\]\s*){0,2}"
                  r"(?P<name>[A-Za-z_][\w.]*)\+0x[0-9a-f]+")
_AT = re.compile(r"\bat: (?:\[<?[0-9a-f]+>?\]\s*)?(?P<name>[A-Za-z_][\w.]*)\+0x")

_TITLE_FIXES = (   # syzkaller's dynamicTitleReplacement: keep titles stable across runs
    (re.compile(r"([A-Za-z][\w.]*)\+0x[0-9a-f]+/0x[0-9a-f]+"), r"\1"),
    (re.compile(r"([^A-Za-z0-9])(?:0x)?[0-9a-f]{6,}"), r"\1ADDR"),
    (re.compile(r"(\.\w+)(?::\d+)+"), r"\1:LINE"),
    (re.compile(r"CPU#\d+"), "CPU"),
    (re.compile(r"(\W)\d+(?=\W|$)"), r"\1NUM"),
)
_MAX_TITLE = 120


@dataclass
class Report:
    """One kernel report.

    function is the frame the title names (generic frames skipped, syscall
    prefixes stripped); file/line say where the kernel reports it fired.
    frames are the reliable frames (not `? `) of the first call trace, kernel
    RIPs inside it included. raw is the report's text; seqs the sequence
    numbers of the records it spans. corrupted says the text is not the whole
    report (cut off, printk messages dropped, no readable frames), so the
    title is a best guess, as syzkaller flags it; corrupted_reason says why.
    """
    type: str
    title: str
    file: str | None = None
    line: int | None = None
    function: str | None = None
    frames: list[str] = field(default_factory=list)
    raw: str = ""
    seqs: list[int] = field(default_factory=list)
    corrupted: bool = False
    corrupted_reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Span:
    rtype: ReportType
    match: re.Match
    start: int          # first line: `cut here`, the ruler, or the header itself
    header: int
    end: int            # last line, inclusive
    ruler: str | None   # the ruler that opened it: the same ruler closes it
    closed: bool = False    # an end marker or its closing ruler ended it
    cut: bool = False       # another report began while it was open


def _match_start(text: str) -> tuple[ReportType, re.Match] | None:
    for rtype in REPORT_TYPES:
        m = rtype.start.search(text)
        if m:
            return rtype, m
    return None


def _group(lines: list[str]) -> list[_Span]:
    spans: list[_Span] = []
    cur: _Span | None = None
    preamble: int | None = None
    for i, text in enumerate(lines):
        if cur and (_END.search(text) or (cur.ruler and i > cur.header and text == cur.ruler)):
            cur.end, cur.closed, cur = i, True, None
            continue
        if _CUT_HERE.search(text) or _RULER.match(text):
            preamble = i
        found = _match_start(text)
        if not found:
            if cur:
                cur.end = i
            continue
        rtype, m = found
        if rtype.attach is not Attach.NEW and cur:
            cur.end = i
            continue
        if rtype.attach is Attach.LAST and spans:
            cur = spans[-1]
            cur.end, cur.closed = i, False
            continue
        start = i
        if (preamble is not None and i - preamble <= _PREAMBLE_REACH
                and (not spans or preamble > spans[-1].header)):
            start = preamble
        if spans and spans[-1].end >= start:       # the open report ends where this one begins
            spans[-1].end = start - 1
        if cur:
            cur.cut = True
        cur = _Span(rtype, m, start, i, i, lines[start] if _RULER.match(lines[start]) else None)
        spans.append(cur)
    return spans


@dataclass
class _Trace:
    frames: list[str] = field(default_factory=list)      # reliable frames and kernel RIPs
    after_irq: int = 0      # where the code the timer interrupt hit starts, if it did
    ended: bool = False     # its end line was seen
    caller: str | None = None   # 32-bit ARM: the last line's caller, a frame if no line follows

    def close(self) -> None:
        if self.caller:
            self.frames.append(self.caller)
            self.caller = None


@dataclass
class _Stack:
    rips: list[str] = field(default_factory=list)        # kernel RIPs before the first trace
    at: list[str] = field(default_factory=list)          # lockdep `at: func+0x...` before it
    traces: list[_Trace] = field(default_factory=list)   # every `Call Trace:` block, in order

    @property
    def first(self) -> list[str]:
        return self.traces[0].frames if self.traces else []


def _base(name: str) -> str:
    return name.split(".", 1)[0]       # foo.isra.0, foo.cold -> foo


def _read_stack(lines: list[str]) -> _Stack:
    st = _Stack()
    cur: _Trace | None = None
    for text in lines:
        arm = _ARM_FRAME.match(text)
        if _TRACE_START.search(text) or (cur is None and arm):
            if cur:
                cur.close()
            cur = _Trace()
            st.traces.append(cur)
            if not arm:
                continue
        if cur is None:
            if not st.traces and (m := _RIP.search(text)):
                st.rips.append(_base(m["name"]))
            elif not st.traces and (m := _AT.search(text)):
                st.at.append(_base(m["name"]))
        elif _TRACE_END.match(text):
            cur.ended = True
            cur.close()
            cur = None
        elif m := _RIP.search(text):
            cur.frames.append(_base(m["name"]))
        else:
            _read_frame(cur, text, arm)
    if cur:
        cur.close()
    return st


def _read_frame(cur: _Trace, text: str, arm: re.Match | None) -> None:
    if _IRQ_END.match(text):     # old kernels print `<EOI>  [<...>] frame` on one line
        cur.after_irq = cur.after_irq or len(cur.frames)
    m = _FRAME.match(text) or arm
    if not m or m.groupdict().get("unreliable") or text.endswith("(unreliable)"):
        return
    cur.frames.append(_base(m["name"]))
    cur.caller = _base(arm["caller"]) if arm else None
    if _IRQ_ENTRY.search(m["name"]):
        cur.after_irq = cur.after_irq or len(cur.frames)


def _strip(frame: str) -> str:
    return min((frame[len(p):] for p in _STRIP_PREFIXES if frame.startswith(p)), key=len, default=frame)


def _stall_frame(frames: list[str]) -> str | None:
    prev = frames[0] if frames else None     # an anchor on top names itself
    for frame in frames:
        if _STALL_ANCHORS.search(frame):
            return "smp_call_function" if "smp_call_function" in frame else prev
        prev = frame
    return None


def _hang_frame(frames: list[str]) -> str | None:
    for frame in frames:
        for anchor, name in _HANG_ANCHORS.items():
            if anchor in frame:
                return name
    return next((f for f in frames if not any(s in f for s in _HANG_SKIP)), None)


@functools.cache
def _skip_pattern(extra: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(_GENERIC_FRAMES + extra))


def _stalled(st: _Stack) -> list[str]:
    """The stalled CPU's trace is the one interrupted by the timer or NMI; the
    frames from where its task context resumes are the looping code. The first
    trace is the stalled CPU's own when its RIP came first (soft lockup)."""
    own = st.rips and st.traces and not st.traces[0].after_irq
    irq = None if own else next((t for t in st.traces if t.after_irq), None)
    return irq.frames[irq.after_irq:] if irq else st.rips + st.first


def _choose_frame(rtype: ReportType, header_fn: str | None, st: _Stack) -> str | None:
    if rtype.frame is Frame.NONE:
        return None
    skip = _skip_pattern(rtype.skip)
    return rtype.frame.pick([_strip(f) for f in rtype.frame.candidates(header_fn, st) if not skip.search(f)])


def _stable_title(title: str) -> str:
    for pattern, repl in _TITLE_FIXES:
        title = pattern.sub(repl, title)
    title = "".join(ch if ch.isprintable() else " " for ch in title)
    return " ".join(title.split())[:_MAX_TITLE].rstrip()


def _line_number(text: str | None) -> int | None:
    # a line number past any source file's (int() refuses thousands of digits)
    return int(text) if text is not None and len(text) <= 9 else None


# Signs that a report's text is not whole, in the order they are reported.
_DROPPED = re.compile(r"\*\* \d+ printk messages dropped \*\*")
_GLUED = re.compile(r".\[\s*\d+\.\d{3,}\](?:\[\s*[TC]\d+\])?")   # a second console prefix mid-line
_MIN_FRAMES = 3         # a trace cut off by the end of the log before this many frames is truncated


def _corruption(rtype: ReportType, func: str | None, st: _Stack, dropped: bool, header: str,
                at_end: bool, cut: bool) -> str | None:
    """Why this report's text is not the whole report, or None."""
    if dropped:
        return "printk messages were dropped inside it"
    if _GLUED.search(header):
        return "interleaved: another line is glued to its header"
    if rtype.frame is Frame.NONE:
        return None
    if func is None:
        return "no usable stack frame"
    if cut and not st.first:
        return "interleaved: another report began before its call trace"
    last = st.traces[-1] if st.traces else None
    if at_end and last and not last.ended and len(last.frames) < _MIN_FRAMES:
        return "truncated: the log ends inside its call trace"
    return None


def _build(span: _Span, lines: list[str], stream: _Stream) -> Report:
    rtype = span.rtype
    body = lines[span.header + 1:span.end + 1]
    fields = {k: v for k, v in span.match.groupdict().items() if v is not None}
    if rtype.detail:
        for text in body:
            if m := rtype.detail.search(text):
                fields = {**{k: v for k, v in m.groupdict().items() if v is not None}, **fields}
                break
    st = _read_stack(body)
    if not st.traces:         # KMSAN, KFENCE, kmemleak...: the frames follow the header directly
        st.traces = _read_stack(["Call Trace:", *body]).traces
    func = _choose_frame(rtype, fields.get("fn") and _base(fields["fn"]), st)
    # syzkaller's word for a report whose frames could not be read
    title = rtype.title.format_map(defaultdict(str, fields, func=func or "corrupted"))
    raw = stream.lines[span.start:span.end + 1]
    dropped = any(stream.dropped[span.start:span.end + 1])
    why = _corruption(rtype, func, st, dropped, stream.lines[span.header], span.end == len(lines) - 1,
                      span.cut)
    return Report(type=rtype.name, title=_stable_title(title), file=fields.get("file"),
                  line=_line_number(fields.get("line")), function=func,
                  frames=st.first, raw="\n".join(raw),
                  seqs=list(dict.fromkeys(stream.seqs[span.start:span.end + 1])),
                  corrupted=why is not None, corrupted_reason=why)


@dataclass
class _Stream:
    """The lines one printer (a `[T123]` task or `[C1]` CPU) wrote, in order."""
    printer: str | None = None
    index: list[int] = field(default_factory=list)      # each line's place in the whole log
    seqs: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    dropped: list[bool] = field(default_factory=list)   # the console said messages were lost here

    def reports(self) -> list[Found]:
        # Matching works on left-stripped lines, so that indented excerpts (mails,
        # commit messages) parse too; raw keeps the text as it was.
        stripped = [text.lstrip() for text in self.lines]
        return [Found(self.index[span.start], self.index[span.header], _build(span, stripped, self),
                      span.closed, len(self.lines) - 1 - span.end, self.printer)
                for span in _group(stripped)]


def _streams(records: Iterable[Record]) -> list[_Stream]:
    """The log split by printer where the console tags lines with one (CONFIG_PRINTK_CALLER):
    two CPUs' reports printed at once then parse as two whole reports. Untagged
    lines belong with the line before them."""
    streams: dict[str | None, _Stream] = {}
    caller: str | None = None
    n = 0
    for rec in records:
        caller = rec.caller or caller
        stream = streams.setdefault(caller, _Stream(caller))
        dropped = bool(_DROPPED.search(rec.raw or rec.message))
        for text in rec.lines():
            stream.dropped.append(dropped)
            stream.index.append(n)
            stream.seqs.append(rec.seq)
            stream.lines.append(text.rstrip())
            n += 1
    return list(streams.values())


@dataclass
class Found:
    """A report where it was found: what a follower of a live log needs to know
    whether more lines could still change it. at and header are line numbers in
    the whole log (its first line, its header line); after counts the lines its
    printer (the console's caller tag, None for untagged text) wrote after it."""
    at: int
    header: int
    report: Report
    closed: bool
    after: int
    printer: str | None = None


def is_boundary(text: str) -> bool:
    """Whether a log line can start, end or close a report: the lines after which
    a follower of a live log looks again."""
    text = text.strip()
    return bool(_END.search(text) or _RULER.match(text) or _match_start(text))


def find_reports(records: Iterable[Record]) -> list[Found]:
    """The reports in these records, in the order of their header lines, with
    where they were found."""
    found = [f for stream in _streams(records) for f in stream.reports()]
    return sorted(found, key=lambda f: f.header)


def parse_reports(records: Iterable[Record]) -> list[Report]:
    """The reports in these records, in log order."""
    return [f.report for f in find_reports(records)]


def corrupted_note(rep: dict) -> str:
    """What a printed title adds when the report (a Report.to_dict()) is flagged
    corrupted: ` (corrupted report: REASON)`; the title itself stays as it is, to
    be searched and deduplicated."""
    if not rep.get("corrupted"):
        return ""
    return f" (corrupted report: {rep.get('corrupted_reason') or 'no reason given'})"
