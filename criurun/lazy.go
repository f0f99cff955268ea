package criurun

// Lazy restore (issue 16), as CRIU builds it (criu/uffd.c): `criu restore --lazy-pages` restores
// every task but leaves the runs its pagemaps mark PE_LAZY (anonymous private memory, which a
// plain dump already marks) unpopulated and registered with a userfaultfd per task; it hands those
// descriptors to a lazy-pages daemon (the agent's own: uffd.go), which fills a page when a task
// faults on it and every other one in the background once the restore has finished.
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
