package criurun

import (
	"bytes"
	"encoding/binary"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// <linux/userfaultfd.h>, for playing CRIU's restorer in the test.
const (
	testUffdioAPI      = 0xC018AA3F
	testUffdioRegister = 0xC020AA00
	testUffdFeatures   = 1<<1 | 1<<2 | 1<<3 | 1<<6 // EVENT_FORK, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP
)

// registeredMemory maps n private anonymous pages and registers them with a new userfaultfd with
// the non-cooperative events, as CRIU's restorer does for a task's lazy runs.
func registeredMemory(t *testing.T, n int) ([]byte, int) {
	if os.Geteuid() != 0 {
		t.Skip("a userfaultfd with fork events needs CAP_SYS_PTRACE")
	}
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if errno != 0 {
		t.Skipf("userfaultfd: %v", errno)
	}
	api := [3]uint64{0xAA, testUffdFeatures, 0}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, testUffdioAPI, uintptr(unsafe.Pointer(&api))); errno != 0 {
		unix.Close(int(fd))
		t.Skipf("UFFDIO_API with non-cooperative events: %v", errno)
	}
	mem, err := unix.Mmap(-1, 0, n*PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	require.NoError(t, err)
	reg := [4]uint64{uint64(uintptr(unsafe.Pointer(&mem[0]))), uint64(len(mem)), 1 /* MISSING */, 0}
	_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, testUffdioRegister, uintptr(unsafe.Pointer(&reg)))
	require.Zero(t, errno, "UFFDIO_REGISTER")
	t.Cleanup(func() { _ = unix.Munmap(mem) })
	return mem, int(fd)
}

// handOver plays `criu restore --lazy-pages`: the task's PID in the images, then its userfaultfd.
func handOver(t *testing.T, conn *net.UnixConn, pid int32, uffd int) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], uint32(pid))
	_, err := conn.Write(b[:])
	require.NoError(t, err)
	_, _, err = conn.WriteMsgUnix([]byte{0}, unix.UnixRights(uffd), nil)
	require.NoError(t, err)
}

// touch reads page i of mem, bounded: a fault nobody answers blocks the reader for good. The
// kernel reads it (write(2) into a pipe): a goroutine blocked on a fault in Go code would hold up
// the garbage collector's stop-the-world, and with it the daemon's goroutine.
func touch(t *testing.T, mem []byte, i int) []byte {
	got := make(chan []byte, 1)
	go func() {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			got <- nil
			return
		}
		defer unix.Close(p[0])
		defer unix.Close(p[1])
		if _, err := unix.Write(p[1], mem[i*PageSize:(i+1)*PageSize]); err != nil {
			got <- nil
			return
		}
		b := make([]byte, PageSize)
		n, _ := unix.Read(p[0], b)
		got <- b[:n]
	}()
	select {
	case b := <-got:
		return b
	case <-time.After(10 * time.Second):
		t.Fatalf("page %d: the fault was never answered", i)
		return nil
	}
}

// lazyDaemonOn starts a daemon whose checkpoint has the first n pages of mem (page i full of
// byte i+1) as one lazy run of task 7, and hands it uffd (closed here: the daemon's now, as after
// CRIU's restore). The connection stays open for restoreFinished.
func lazyDaemonOn(t *testing.T, mem []byte, n, uffd int) (*LazyDaemon, *net.UnixConn) {
	pages := make([]byte, n*PageSize)
	for i := range pages {
		pages[i] = byte(i/PageSize + 1)
	}
	base := uint64(uintptr(unsafe.Pointer(&mem[0])))
	pm, err := ParsePagemap(bytes.NewReader(pagemapImage(1, []PagemapEntry{{Vaddr: base, NrPages: uint64(n), Flags: pePresent | peLazy}})))
	require.NoError(t, err)
	src := NewPageServer(map[uint64]*Pagemap{7: pm}, memImages{"pages-1.img": pages})
	t.Cleanup(src.Close)
	work := t.TempDir()
	d, err := StartLazyDaemon(work, src)
	require.NoError(t, err)
	t.Cleanup(d.Stop)
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: filepath.Join(work, LazySocketName), Net: "unix"})
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	handOver(t, conn, 7, uffd)
	unix.Close(uffd)
	return d, conn
}

// restoreFinished plays the end of CRIU's restore and waits for the background transfer.
func restoreFinished(t *testing.T, d *LazyDaemon, conn *net.UnixConn) {
	var fin [4]byte
	binary.LittleEndian.PutUint32(fin[:], lazyRestoreFinished)
	_, err := conn.Write(fin[:])
	require.NoError(t, err)
	select {
	case <-d.Complete():
	case <-time.After(10 * time.Second):
		t.Fatal("the background transfer did not complete")
	}
}

// The daemon against a real userfaultfd: a fault gets the checkpoint's page (a zero page where the
// checkpoint has none); memory the app gives back with madvise(DONTNEED) while its pages are still
// missing reads as zeros, never as the checkpoint's stale pages (CRIU's daemon could hang the app
// there); the background copies the rest once the restore is finished, and the daemon closes the
// userfaultfd when stopped.
func TestLazyDaemonServesFaults(t *testing.T) {
	const n = 64
	mem, uffd := registeredMemory(t, n)
	// The checkpoint has pages 0-31 (page i full of byte i+1), lazily; 32-63 were never touched.
	d, conn := lazyDaemonOn(t, mem, 32, uffd)

	assert.Equal(t, bytes.Repeat([]byte{21}, PageSize), touch(t, mem, 20), "a fault gets the checkpoint's page")
	assert.Equal(t, make([]byte, PageSize), touch(t, mem, 40), "a page the checkpoint does not have is a zero page")
	// Given back while still missing: the REMOVE event reaches the daemon before madvise returns.
	require.NoError(t, unix.Madvise(mem[2*PageSize:5*PageSize], unix.MADV_DONTNEED))
	assert.Equal(t, make([]byte, PageSize), touch(t, mem, 3), "memory given back reads as zeros")
	select {
	case <-d.Complete():
		t.Fatal("complete before the restore finished")
	default:
	}

	restoreFinished(t, d, conn)
	for i := 0; i < n; i++ {
		want := byte(0)
		if i < 32 && (i < 2 || i >= 5) {
			want = byte(i + 1)
		}
		assert.Equal(t, bytes.Repeat([]byte{want}, PageSize), touch(t, mem, i), "page %d", i)
	}
	bytesIn, faults, zeros, _ := d.Stats()
	assert.Equal(t, int64(29*PageSize), bytesIn, "every page the checkpoint has, once, but those given back")
	assert.GreaterOrEqual(t, faults, int64(3))
	assert.GreaterOrEqual(t, zeros, int64(2))

	d.Stop()
	require.NoError(t, d.Err())
	fds, _ := filepath.Glob("/proc/self/fd/*")
	for _, fd := range fds {
		target, _ := os.Readlink(fd)
		assert.NotEqual(t, "anon_inode:[userfaultfd]", target, "the daemon closed its userfaultfd")
	}
}

// A run of the checkpoint that now spans two mappings (CRIU dumps neighbouring mappings as one
// run; an mprotect or madvise splits one without an event): UFFDIO_COPY refuses a range across
// the boundary, and every page still gets its own contents, none a zero page.
func TestLazyDaemonRunAcrossMappings(t *testing.T) {
	const n = 32
	mem, uffd := registeredMemory(t, n)
	require.NoError(t, unix.Madvise(mem[16*PageSize:], unix.MADV_DONTFORK), "split the mapping in two")
	d, conn := lazyDaemonOn(t, mem, n, uffd)

	assert.Equal(t, bytes.Repeat([]byte{11}, PageSize), touch(t, mem, 10), "a fault whose pages cross into the next mapping")
	restoreFinished(t, d, conn)
	for i := 0; i < n; i++ {
		assert.Equal(t, bytes.Repeat([]byte{byte(i + 1)}, PageSize), touch(t, mem, i), "page %d", i)
	}
	_, _, zeros, _ := d.Stats()
	assert.Zero(t, zeros)
}
