package criurun

// The lazy-pages daemon, in the agent (issue 16). `criu restore --lazy-pages` restores every task
// with its lazy runs (anonymous private memory) registered with a userfaultfd and unpopulated, and
// hands each task's descriptor over the unix socket "lazy-pages.socket" of its work directory
// (criu/uffd.c send_uffd: the task's PID in the images as an int32, then the descriptor with
// SCM_RIGHTS on one dummy byte; a zombie's negative PID comes alone; lazyRestoreFinished once the
// restore is done). The daemon answers each fault with the pages from the verified checkpoint (a
// zero page where the checkpoint has none), follows the app's forks, mremaps, munmaps and
// madvise(DONTNEED)s, and copies every other page in the background.
//
// CRIU has such a daemon (`criu lazy-pages`), and Stasis used it until it hung apps: a madvise
// that splits one of its in-flight requests leaves the rest of the request matching no answer,
// and a task that faults there waits forever (uffd_io_complete); it also closes a task's
// descriptor once that task's pages are in, so a copy kept open elsewhere (the guard's) left later
// faults of the task unanswered. Here one goroutine handles everything in order, and every
// descriptor stays open and answered until the caller stops the daemon, after the whole tree is
// complete.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	// LazySocketName is the socket `criu restore --lazy-pages` connects to, in its work directory.
	LazySocketName      = "lazy-pages.socket"
	lazyRestoreFinished = 0x52535446 // "ReSTore Finished"

	// <linux/userfaultfd.h>, _IOWR/_IOR(0xAA, nr, struct).
	uffdioWake     = 0x8010AA02 // struct uffdio_range
	uffdioCopy     = 0xC028AA03 // struct uffdio_copy
	uffdioZeropage = 0xC020AA04 // struct uffdio_zeropage

	uffdEventPagefault = 0x12
	uffdEventFork      = 0x13
	uffdEventRemap     = 0x14
	uffdEventRemove    = 0x15
	uffdEventUnmap     = 0x16
	uffdMsgSize        = 32

	// A fault gets its page and the next ones of the run (neighbours are likely next); the
	// background copies larger pieces between events.
	faultPages      = 16
	backgroundPages = 256
)

type uffdioCopyArg struct {
	dst, src, len, mode uint64
	copied              int64
}

type uffdioZeropageArg struct {
	start, len, mode uint64
	zeropage         int64
}

type uffdioRangeArg struct{ start, len uint64 }

// span is a run of a task's address space still missing its pages: [start, end), whose data is at
// img in the task's pages (they differ once the app mremaps it).
type span struct{ start, end, img uint64 }

// lazyTask is one userfaultfd: a restored task, or a child it forked since.
type lazyTask struct {
	id    uint64 // the PID in the images: whose pagemap serves it
	uffd  int    // raw: an *os.File's Fd() would make it blocking
	spans []span // sorted, disjoint
	gone  bool   // its address space is gone (it exited or exec'd)
}

// LazyDaemon serves the userfaultfds of one lazy restore.
type LazyDaemon struct {
	pages        *PageServer
	ln           *net.UnixListener
	wakeR, wakeW int // a byte on wakeW: a new task, or Stop

	mu       sync.Mutex
	incoming []*lazyTask // received from the restore
	restored bool        // lazyRestoreFinished received
	stopping bool
	onFork   func(uffd int)
	closed   bool // the loop has ended and closed the descriptors

	// The loop's only.
	tasks      []*lazyTask
	adopted    int // of incoming
	retry      []retryFault
	next       int // round-robin of the background copy
	buf        []byte
	complete   chan struct{}
	restoredCh chan struct{}
	done       chan struct{}
	err        error

	served            atomic.Int64 // page bytes copied into the app
	faults, zeroPages atomic.Int64
	reading           atomic.Int64 // nanoseconds reading (and checking) pages
}

type retryFault struct {
	t    *lazyTask
	addr uint64
}

// StartLazyDaemon listens on LazySocketName in work (the restore's work directory) and serves the
// restore's tasks from pages. Start the restore after it; Stop it once Complete is closed (or to
// give up).
func StartLazyDaemon(work string, pages *PageServer) (*LazyDaemon, error) {
	path := filepath.Join(work, LazySocketName)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("lazy-pages socket: %w", err)
	}
	var wake [2]int
	if err := unix.Pipe2(wake[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		ln.Close()
		return nil, err
	}
	d := &LazyDaemon{pages: pages, ln: ln, wakeR: wake[0], wakeW: wake[1],
		complete: make(chan struct{}), restoredCh: make(chan struct{}), done: make(chan struct{})}
	go d.receive()
	go func() {
		d.err = d.loop()
		d.closeAll()
		close(d.done)
	}()
	return d, nil
}

// Restored is closed once the restore has handed over every task.
func (d *LazyDaemon) Restored() <-chan struct{} { return d.restoredCh }

// Complete is closed once every page of every task is in. The daemon still answers faults (with
// zero pages: memory the checkpoint did not have) until Stop.
func (d *LazyDaemon) Complete() <-chan struct{} { return d.complete }

// Done is closed when the daemon has stopped: Err says why.
func (d *LazyDaemon) Done() <-chan struct{} { return d.done }

// Err is why the daemon stopped: nil after Stop, ErrPagesUnverified when pages did not verify
// (the task that faulted on them stays blocked), another error when a userfaultfd failed.
func (d *LazyDaemon) Err() error {
	<-d.done
	return d.err
}

// Stats says how many page bytes were copied, how many faults were answered (how many with a zero
// page) and how long reading and checking pages took.
func (d *LazyDaemon) Stats() (bytes, faults, zeroPages int64, reading time.Duration) {
	return d.served.Load(), d.faults.Load(), d.zeroPages.Load(), time.Duration(d.reading.Load())
}

// Userfaultfds returns copies of the restored tasks' userfaultfds (call after Restored): while a
// copy is open, a task that faults on a page not yet in stays blocked, even if the agent is gone.
func (d *LazyDaemon) Userfaultfds() ([]*os.File, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, errors.New("the lazy-pages daemon has stopped")
	}
	var out []*os.File
	for _, t := range d.incoming {
		fd, err := unix.FcntlInt(uintptr(t.uffd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			for _, f := range out {
				f.Close()
			}
			return nil, err
		}
		out = append(out, os.NewFile(uintptr(fd), "userfaultfd"))
	}
	return out, nil
}

// OnFork sets a function called with the userfaultfd of each child an app task forks from now
// on (the daemon keeps it; the function may dup it, e.g. for the guard to hold).
func (d *LazyDaemon) OnFork(f func(uffd int)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.onFork = f
}

// Stop ends the daemon, which closes its descriptors: any page not in by then is a zero page to
// the app. Call it once Complete is closed, or once the restored tree is dead. It waits a while
// for the daemon (a read of pages may hang on a stalled disk; the daemon then closes them when it
// returns).
func (d *LazyDaemon) Stop() {
	d.mu.Lock()
	d.stopping = true
	d.mu.Unlock()
	d.ln.Close()
	d.wake()
	select {
	case <-d.done:
	case <-time.After(5 * time.Second):
	}
}

// closeAll closes the userfaultfds and the wake pipe, once the loop has ended.
func (d *LazyDaemon) closeAll() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, t := range append(d.tasks, d.incoming[d.adopted:]...) {
		unix.Close(t.uffd)
	}
	d.incoming, d.tasks, d.adopted = nil, nil, 0
	unix.Close(d.wakeR)
	unix.Close(d.wakeW)
	d.closed = true
}

func (d *LazyDaemon) wake() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.closed {
		_, _ = unix.Write(d.wakeW, []byte{0})
	}
}

// receive takes the restore's connection and its tasks' userfaultfds.
func (d *LazyDaemon) receive() {
	conn, err := d.ln.AcceptUnix()
	d.ln.Close() // one restore
	if err != nil {
		return
	}
	defer conn.Close()
	for {
		var b [4]byte
		if _, err := io.ReadFull(conn, b[:]); err != nil {
			return
		}
		v := int32(binary.LittleEndian.Uint32(b[:]))
		switch {
		case v == lazyRestoreFinished:
			d.mu.Lock()
			d.restored = true
			d.mu.Unlock()
			close(d.restoredCh)
			d.wake()
			return
		case v <= 0: // a zombie: no memory
			continue
		}
		fd, err := recvFD(conn)
		if err != nil {
			return
		}
		t, err := d.newTask(uint64(v), fd)
		if err != nil {
			unix.Close(fd)
			return
		}
		d.mu.Lock()
		if d.closed {
			d.mu.Unlock()
			unix.Close(fd)
			return
		}
		d.incoming = append(d.incoming, t)
		d.mu.Unlock()
		d.wake()
	}
}

// newTask builds a restored task's missing runs from its pagemap.
func (d *LazyDaemon) newTask(id uint64, uffd int) (*lazyTask, error) {
	pm, ok := d.pages.tasks[id]
	if !ok {
		return nil, fmt.Errorf("no pagemap for task %d", id)
	}
	t := &lazyTask{id: id, uffd: uffd}
	for _, e := range pm.Entries {
		if e.Lazy() && e.Present() {
			t.spans = append(t.spans, span{e.Vaddr, e.end(), e.Vaddr})
		}
	}
	return t, nil
}

// recvFD reads one descriptor sent with SCM_RIGHTS on a dummy byte.
func recvFD(conn *net.UnixConn) (int, error) {
	var b [1]byte
	oob := make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := conn.ReadMsgUnix(b[:], oob)
	if err != nil {
		return -1, err
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return -1, fmt.Errorf("lazy-pages socket: no descriptor (%v)", err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return -1, fmt.Errorf("lazy-pages socket: want one descriptor (%v)", err)
	}
	return fds[0], nil
}

// loop handles every task's events, then copies one piece in the background, until Stop.
func (d *LazyDaemon) loop() error {
	fds := []unix.PollFd{}
	var buf [uffdMsgSize * 16]byte
	for {
		d.mu.Lock()
		if d.stopping {
			d.mu.Unlock()
			return nil
		}
		d.tasks = append(d.tasks, d.incoming[d.adopted:]...)
		d.adopted = len(d.incoming)
		restored := d.restored
		d.mu.Unlock()
		missing := d.missing()
		if restored && !missing && len(d.retry) == 0 {
			select {
			case <-d.complete:
			default:
				close(d.complete)
			}
		}
		fds = fds[:0]
		fds = append(fds, unix.PollFd{Fd: int32(d.wakeR), Events: unix.POLLIN})
		for _, t := range d.tasks {
			fd := int32(-1) // poll skips it
			if !t.gone {
				fd = int32(t.uffd)
			}
			fds = append(fds, unix.PollFd{Fd: fd, Events: unix.POLLIN})
		}
		timeout := -1
		if (restored && missing) || len(d.retry) > 0 {
			timeout = 0
		}
		if _, err := unix.Poll(fds, timeout); err != nil && err != unix.EINTR {
			return fmt.Errorf("poll: %w", err)
		}
		if fds[0].Revents != 0 {
			_, _ = unix.Read(d.wakeR, buf[:])
		}
		for i, t := range d.tasks[:len(fds)-1] {
			re := fds[i+1].Revents
			if re&unix.POLLIN != 0 {
				if err := d.events(t, buf[:]); err != nil {
					return err
				}
			} else if re&(unix.POLLHUP|unix.POLLERR) != 0 {
				t.gone = true
			}
		}
		if err := d.retryFaults(); err != nil {
			return err
		}
		if restored && len(d.retry) == 0 {
			if err := d.background(); err != nil {
				return err
			}
		}
	}
}

// missing says whether a live task still misses pages.
func (d *LazyDaemon) missing() bool {
	for _, t := range d.tasks {
		if !t.gone && len(t.spans) > 0 {
			return true
		}
	}
	return false
}

// events reads and handles the pending messages of t's userfaultfd: one read, after poll said
// there may be some; more are left for the next poll. Its flags are shared with the guard's copy,
// which os/exec makes blocking.
func (d *LazyDaemon) events(t *lazyTask, buf []byte) error {
	// The kernel may wake a fault before it is read (a signal to the faulting thread): poll's
	// answer does not promise a message, and a blocking read would stall every task.
	_ = unix.SetNonblock(t.uffd, true)
	n, err := unix.Read(t.uffd, buf)
	if err == unix.EAGAIN || err == unix.EINTR {
		return nil
	}
	if err != nil || n == 0 {
		t.gone = true // its address space is gone
		return nil
	}
	for off := 0; off+uffdMsgSize <= n; off += uffdMsgSize {
		if err := d.event(t, buf[off:off+uffdMsgSize]); err != nil {
			return err
		}
	}
	return nil
}

// event handles one struct uffd_msg: u8 event, 7 reserved bytes, then the event's arguments.
func (d *LazyDaemon) event(t *lazyTask, m []byte) error {
	arg := func(i int) uint64 { return binary.LittleEndian.Uint64(m[8+8*i:]) }
	switch m[0] {
	case uffdEventPagefault: // flags, address
		d.faults.Add(1)
		return d.fault(t, arg(1)&^(PageSize-1))
	case uffdEventFork: // the child's userfaultfd, already installed in this process
		fd := int(binary.LittleEndian.Uint32(m[8:]))
		unix.CloseOnExec(fd)
		child := &lazyTask{id: t.id, uffd: fd, spans: append([]span(nil), t.spans...)}
		d.tasks = append(d.tasks, child)
		d.mu.Lock()
		onFork := d.onFork
		d.mu.Unlock()
		if onFork != nil {
			onFork(fd)
		}
	case uffdEventRemap: // from, to, len
		t.remap(arg(0), arg(1), arg(2))
	case uffdEventRemove, uffdEventUnmap: // start, end: what was there is gone, zeros from now on
		t.drop(arg(0), arg(1))
	default:
		return fmt.Errorf("userfaultfd: unexpected event %#x", m[0])
	}
	return nil
}

// fault answers a fault at addr: the pages from there on if the checkpoint has them, else a zero
// page. A copy refused while the app's mappings change (EAGAIN) is retried after those events.
func (d *LazyDaemon) fault(t *lazyTask, addr uint64) error {
	if t.gone {
		return nil
	}
	i := t.find(addr)
	if i < 0 {
		err := zeropage(t.uffd, addr)
		switch {
		case err == nil:
			d.zeroPages.Add(1)
		case err == unix.EAGAIN:
			d.retry = append(d.retry, retryFault{t, addr})
		case err == unix.EEXIST || err == unix.ENOENT:
			wake(t.uffd, addr, PageSize)
		case err == unix.ESRCH:
			t.gone = true
		default:
			return fmt.Errorf("userfaultfd: zero page at %#x: %w", addr, err)
		}
		return nil
	}
	s := t.spans[i]
	n := min(faultPages, (s.end-addr)/PageSize)
	again, err := d.copyIn(t, addr, s.img+(addr-s.start), n)
	if again {
		d.retry = append(d.retry, retryFault{t, addr})
	}
	return err
}

func (d *LazyDaemon) retryFaults() error {
	faults := d.retry
	d.retry = nil
	for _, f := range faults {
		if err := d.fault(f.t, f.addr); err != nil {
			return err
		}
	}
	return nil
}

// background copies one piece of a task's missing pages, taking the tasks in turn.
func (d *LazyDaemon) background() error {
	for k := range d.tasks {
		t := d.tasks[(d.next+k)%len(d.tasks)]
		if t.gone || len(t.spans) == 0 {
			continue
		}
		d.next = (d.next + k + 1) % len(d.tasks)
		s := t.spans[0]
		_, err := d.copyIn(t, s.start, s.img, min(backgroundPages, (s.end-s.start)/PageSize))
		return err
	}
	return nil
}

// copyIn copies up to n pages of t's image at img to addr, and takes what went in (or turned out
// to be there already) out of t's missing runs. again: the kernel asked to retry (the app's
// mappings are changing: their events come first).
func (d *LazyDaemon) copyIn(t *lazyTask, addr, img, n uint64) (again bool, err error) {
	start := time.Now()
	data, got, err := d.pages.read(t.id, img, n, d.buf)
	d.buf = data[:cap(data)]
	d.reading.Add(int64(time.Since(start)))
	if err != nil {
		return false, fmt.Errorf("%w: task %d, %d pages at %#x: %v", ErrPagesUnverified, t.id, n, img, err)
	}
	copied, err := uffdCopy(t.uffd, addr, data)
	d.served.Add(int64(copied))
	t.drop(addr, addr+copied)
	switch {
	case err == nil:
	case err == unix.EAGAIN:
		return true, nil
	case err == unix.EEXIST: // the page after the copied ones is there already: the app's own
		t.drop(addr+copied, addr+copied+PageSize)
		wake(t.uffd, addr+copied, PageSize)
	case err == unix.ENOENT && got*PageSize-copied > PageSize:
		// UFFDIO_COPY works within one mapping, and a run of the checkpoint may now span
		// several (CRIU dumps neighbouring mappings as one run; an mprotect splits one without
		// an event): page by page, to tell a boundary from memory that is gone.
		return d.copyPages(t, addr+copied, data[copied:])
	case err == unix.ENOENT: // no longer mapped (or registered) there: gone with its events
		t.drop(addr+copied, addr+got*PageSize)
		wake(t.uffd, addr+copied, got*PageSize-copied)
	case err == unix.ESRCH:
		t.gone = true
	default:
		return false, fmt.Errorf("userfaultfd: copying %d pages to %#x: %w", got, addr, err)
	}
	return false, nil
}

// copyPages copies data to addr one page at a time (see copyIn), dropping each page that went in,
// was there already, or is no longer mapped.
func (d *LazyDaemon) copyPages(t *lazyTask, addr uint64, data []byte) (again bool, err error) {
	for off := uint64(0); off < uint64(len(data)); off += PageSize {
		a := addr + off
		copied, err := uffdCopy(t.uffd, a, data[off:off+PageSize])
		d.served.Add(int64(copied))
		switch {
		case err == nil:
			t.drop(a, a+PageSize)
		case err == unix.EEXIST || err == unix.ENOENT:
			t.drop(a, a+PageSize)
			wake(t.uffd, a, PageSize)
		case err == unix.EAGAIN:
			return true, nil
		case err == unix.ESRCH:
			t.gone = true
			return false, nil
		default:
			return false, fmt.Errorf("userfaultfd: copying a page to %#x: %w", a, err)
		}
	}
	return false, nil
}

// find returns the index of the span holding addr, or -1.
func (t *lazyTask) find(addr uint64) int {
	i := sort.Search(len(t.spans), func(i int) bool { return t.spans[i].end > addr })
	if i == len(t.spans) || t.spans[i].start > addr {
		return -1
	}
	return i
}

// drop takes [a, b) out of t's missing runs.
func (t *lazyTask) drop(a, b uint64) {
	if a >= b {
		return
	}
	out := t.spans[:0:0]
	for _, s := range t.spans {
		if s.end <= a || s.start >= b {
			out = append(out, s)
			continue
		}
		if s.start < a {
			out = append(out, span{s.start, a, s.img})
		}
		if s.end > b {
			out = append(out, span{b, s.end, s.img + (b - s.start)})
		}
	}
	t.spans = out
}

// remap moves the missing runs in [from, from+n) to the same place after to (mremap).
func (t *lazyTask) remap(from, to, n uint64) {
	var moved []span
	for _, s := range t.spans {
		if s.end <= from || s.start >= from+n {
			continue
		}
		a, b := max(s.start, from), min(s.end, from+n)
		moved = append(moved, span{a - from + to, b - from + to, s.img + (a - s.start)})
	}
	t.drop(from, from+n)
	t.drop(to, to+n) // what was mapped there before is unmapped
	t.spans = append(t.spans, moved...)
	sort.Slice(t.spans, func(i, j int) bool { return t.spans[i].start < t.spans[j].start })
}

// uffdCopy copies data to addr (UFFDIO_COPY, waking the faulting threads); it returns how many
// bytes went in before an error.
func uffdCopy(uffd int, addr uint64, data []byte) (uint64, error) {
	a := uffdioCopyArg{dst: addr, src: uint64(uintptr(unsafe.Pointer(&data[0]))), len: uint64(len(data))}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(uffd), uffdioCopy, uintptr(unsafe.Pointer(&a)))
	runtime.KeepAlive(data)
	copied := uint64(max(a.copied, 0))
	if errno != 0 {
		return copied, errno
	}
	return copied, nil
}

func zeropage(uffd int, addr uint64) error {
	a := uffdioZeropageArg{start: addr, len: PageSize}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(uffd), uffdioZeropage, uintptr(unsafe.Pointer(&a))); errno != 0 {
		return errno
	}
	return nil
}

// wake wakes threads waiting on [addr, addr+n) whose fault was answered some other way.
func wake(uffd int, addr, n uint64) {
	a := uffdioRangeArg{start: addr, len: n}
	_, _, _ = unix.Syscall(unix.SYS_IOCTL, uintptr(uffd), uffdioWake, uintptr(unsafe.Pointer(&a)))
}
