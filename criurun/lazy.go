package criurun

// Lazy restore (issue 16), as CRIU builds it (criu/uffd.c): `criu restore --lazy-pages` restores
// every task but leaves the runs its pagemaps mark PE_LAZY (anonymous private memory, which a
// plain dump already marks) unpopulated and registered with a userfaultfd per task; it hands those
// descriptors over the unix socket "lazy-pages.socket" of its work directory to a `criu
// lazy-pages` daemon, which fills a page when a task faults on it and pulls every other one in the
// background once the restore has finished, asking a page server for them (PS_IOV_GET, see
// pageserver.go). When all pages are in, the daemon closes the page-server session and exits.
//
// The restore itself still reads the non-lazy runs (stacks, file-backed private mappings, vDSO)
// from the pages images, at their offsets: PrepareLazyPages writes those images sparse, with the
// non-lazy runs only.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/checkpoint"
)

// CheckLazyPages asks the bundle's CRIU whether this kernel and this process may restore lazily
// (`criu check --feature uffd-noncoop`: a userfaultfd with the non-cooperative events the daemon
// needs for forks, mremap and exits). nil: yes.
func (b Bundle) CheckLazyPages(ctx context.Context) error {
	plugins, err := os.Open(b.Dir + "/" + bundlePlugins)
	if err != nil {
		return fmt.Errorf("criu bundle: %w", err)
	}
	defer plugins.Close()
	argv := b.argv(3, "check", "--feature", "uffd-noncoop")
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.ExtraFiles = []*os.File{plugins}
	cmd.Env = []string{NoBreakpointsEnv}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("criu check --feature uffd-noncoop: %v: %s", err, bytes.TrimSpace(out))
	}
	return nil
}

var taskPagemap = regexp.MustCompile(`^pagemap-([0-9]+)\.img$`)

// PrepareLazyPages is called with the private images directory dst already holding every image but
// the pages images. For each task's pagemap (pagemap-<pid>.img) it writes that task's pages image
// into dst as a sparse file of the original size holding only the runs `criu restore
// --lazy-pages` reads itself, read from src (verified per chunk). It returns the tasks' pagemaps
// by PID, for the page server, and the pages images it wrote: the caller copies the others
// (shared memory's) whole.
func PrepareLazyPages(src checkpoint.ImageReaderAt, dst *os.File) (map[uint64]*Pagemap, map[string]bool, error) {
	names, err := dst.ReadDir(-1)
	if err != nil {
		return nil, nil, err
	}
	tasks := map[uint64]*Pagemap{}
	written := map[string]bool{}
	for _, n := range names {
		m := taskPagemap.FindStringSubmatch(n.Name())
		if m == nil {
			continue
		}
		pid, _ := strconv.ParseUint(m[1], 10, 64)
		pm, err := readPagemapAt(dst, n.Name())
		if err != nil {
			return nil, nil, err
		}
		tasks[pid] = pm
		if written[pm.PagesImage()] {
			return nil, nil, fmt.Errorf("%s: pages image %s shared with another task", n.Name(), pm.PagesImage())
		}
		if err := writeSparsePages(src, dst, pm); err != nil {
			return nil, nil, err
		}
		written[pm.PagesImage()] = true
	}
	if len(tasks) == 0 {
		return nil, nil, errors.New("no task pagemap among the images")
	}
	return tasks, written, nil
}

func readPagemapAt(dir *os.File, name string) (*Pagemap, error) {
	fd, err := unix.Openat(int(dir.Fd()), name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	pm, err := ParsePagemap(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return pm, nil
}

// writeSparsePages writes pm's pages image into dst: the non-lazy runs at their offsets, holes
// for the lazy ones (never read by the restore).
func writeSparsePages(src checkpoint.ImageReaderAt, dst *os.File, pm *Pagemap) error {
	name := pm.PagesImage()
	in, size, err := src.OpenAt(name)
	if err != nil {
		return fmt.Errorf("%w: %s: %v", ErrPagesUnverified, name, err)
	}
	defer in.Close()
	fd, err := unix.Openat(int(dst.Fd()), name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	out := os.NewFile(uintptr(fd), name)
	defer out.Close()
	if err := out.Truncate(size); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	buf := make([]byte, 1<<20)
	for _, e := range pm.Entries {
		if !e.Present() || e.Lazy() {
			continue
		}
		end := e.Offset + int64(e.NrPages)*PageSize
		if end > size {
			return fmt.Errorf("%s: pagemap run at %#x ends at %d, past the image's %d bytes", name, e.Vaddr, end, size)
		}
		if err := copyRange(out, in, e.Offset, end-e.Offset, buf); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	return nil
}

// LazyPages is a running `criu lazy-pages` daemon and the agent's end of its page-server socket.
type LazyPages struct {
	// Conn is the page server's end: serve it with PageServer.Serve.
	Conn *os.File
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// StartLazyPages starts the daemon on the images (the same private directory the restore reads)
// with work as its working directory (the restore's: the socket between them lives there), and
// waits until it listens. The daemon runs in the agent's namespaces: it only reads images and
// works on the userfaultfds the restore sends it. Its page server is the agent, over a socket pair
// (--ps-socket): no port, nobody else can connect.
func (b Bundle) StartLazyPages(images, work *os.File, logFile string) (*LazyPages, error) {
	plugins, err := os.Open(b.Dir + "/" + bundlePlugins)
	if err != nil {
		return nil, fmt.Errorf("criu bundle: %w", err)
	}
	defer plugins.Close()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("page server socket: %w", err)
	}
	// A whole answer (up to 4 MiB of pages) fits in the socket: the daemon reads it without waiting
	// on the server between pieces.
	if unix.SetsockoptInt(fds[0], unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 8<<20) != nil {
		_ = unix.SetsockoptInt(fds[0], unix.SOL_SOCKET, unix.SO_SNDBUF, 8<<20)
	}
	mine, theirs := os.NewFile(uintptr(fds[0]), "page-server"), os.NewFile(uintptr(fds[1]), "lazy-pages-ps")
	defer theirs.Close()
	statusR, statusW, err := os.Pipe()
	if err != nil {
		mine.Close()
		return nil, err
	}
	defer statusR.Close()
	// fds in the daemon: 3 plugins, 4 images, 5 work, 6 page server, 7 status.
	argv := b.argv(3, "lazy-pages", "--page-server", "--ps-socket", "6", "-D", fdPath(4), "-W", fdPath(5),
		"-o", logFile, "-v2", "--status-fd", "7")
	var stderr bytes.Buffer
	cmd := &exec.Cmd{Path: argv[0], Args: argv, Env: []string{NoBreakpointsEnv}, Stderr: &stderr,
		ExtraFiles: []*os.File{plugins, images, work, theirs, statusW}}
	err = cmd.Start()
	statusW.Close()
	if err != nil {
		mine.Close()
		return nil, fmt.Errorf("starting criu lazy-pages: %w", err)
	}
	l := &LazyPages{Conn: mine, cmd: cmd, done: make(chan struct{})}
	go func() {
		l.err = cmd.Wait()
		if l.err != nil {
			l.err = fmt.Errorf("criu lazy-pages: %w; stderr: %s", l.err, bytes.TrimSpace(stderr.Bytes()))
		}
		close(l.done)
	}()
	ready := make(chan error, 1)
	go func() {
		var b [1]byte
		_, err := statusR.Read(b[:]) // CRIU writes one byte once it listens; EOF if it died
		ready <- err
	}()
	select {
	case err = <-ready:
	case <-time.After(30 * time.Second):
		err = errors.New("not listening after 30 s")
	}
	if err != nil {
		l.Stop()
		return nil, fmt.Errorf("criu lazy-pages did not start: %v (%v)", err, l.Wait())
	}
	return l, nil
}

// Done is closed when the daemon has exited.
func (l *LazyPages) Done() <-chan struct{} { return l.done }

// Wait waits for the daemon's exit and returns its error (nil: it transferred every page and
// closed the page-server session).
func (l *LazyPages) Wait() error {
	<-l.done
	return l.err
}

// Stop kills the daemon (if still running), waits for it and closes the page server's socket.
func (l *LazyPages) Stop() {
	select {
	case <-l.done:
	default:
		_ = l.cmd.Process.Kill()
		<-l.done
	}
	l.Conn.Close()
}

// copyRange copies n bytes at off from in to out; a read error is the source's (ErrPagesUnverified).
func copyRange(out *os.File, in io.ReaderAt, off, n int64, buf []byte) error {
	for n > 0 {
		b := buf[:min(int64(len(buf)), n)]
		if _, err := in.ReadAt(b, off); err != nil {
			return fmt.Errorf("%w: at %d: %v", ErrPagesUnverified, off, err)
		}
		if _, err := out.WriteAt(b, off); err != nil {
			return err
		}
		off, n = off+int64(len(b)), n-int64(len(b))
	}
	return nil
}

// HoldUserfaultfds duplicates into the caller the daemon's userfaultfds. While a copy is open,
// the kernel keeps a task's lazy ranges registered: should the daemon die, a task that faults on a
// page not yet delivered stays blocked (until the agent kills it) instead of finding a zero page,
// which is what a released userfaultfd leaves. The daemon receives one per task with memory (want)
// before it serves anything, and closes each once all of that task's pages are in: so once it
// holds want, or has served a page (started is true), those it holds are all that matter. Close
// the copies once every page is in.
func (l *LazyPages) HoldUserfaultfds(want int, started func() bool, within time.Duration) ([]*os.File, error) {
	pid := l.cmd.Process.Pid
	deadline := time.Now().Add(within)
	for {
		select {
		case <-l.done:
			return nil, l.exitedEarly()
		default:
		}
		if fds := userfaultfds(pid); len(fds) >= want || started() {
			held, err := dupFrom(pid, fds)
			if errors.Is(err, unix.ESRCH) { // it exited meanwhile
				<-l.done
				return nil, l.exitedEarly()
			}
			return held, err
		} else if time.Now().After(deadline) {
			return nil, fmt.Errorf("criu lazy-pages holds %d userfaultfds after %s, want %d", len(fds), within, want)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// exitedEarly is HoldUserfaultfds' verdict on a daemon that exited before its descriptors were
// held: nil if it exited cleanly (every page was in), else why: the app must not resume.
func (l *LazyPages) exitedEarly() error {
	if l.err != nil {
		return fmt.Errorf("criu lazy-pages exited before its userfaultfds were held: %v", l.err)
	}
	return nil
}

// userfaultfds lists the userfaultfd descriptors of process pid.
func userfaultfds(pid int) []int {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, _ := os.ReadDir(dir)
	var out []int
	for _, e := range entries {
		if t, err := os.Readlink(dir + "/" + e.Name()); err == nil && t == "anon_inode:[userfaultfd]" {
			if n, err := strconv.Atoi(e.Name()); err == nil {
				out = append(out, n)
			}
		}
	}
	return out
}

func dupFrom(pid int, fds []int) ([]*os.File, error) {
	pfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("pidfd of criu lazy-pages: %w", err)
	}
	defer unix.Close(pfd)
	var out []*os.File
	for _, fd := range fds {
		n, err := unix.PidfdGetfd(pfd, fd, 0)
		if err == unix.EBADF {
			continue // closed meanwhile: that task has all its pages
		}
		if err != nil {
			for _, f := range out {
				f.Close()
			}
			return nil, fmt.Errorf("userfaultfd %d of criu lazy-pages: %w", fd, err)
		}
		out = append(out, os.NewFile(uintptr(n), "userfaultfd"))
	}
	return out, nil
}
