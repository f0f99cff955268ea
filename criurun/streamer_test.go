package criurun

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// testDirSink is a test helper: an ImageSink writing plain files into a directory, optionally
// failing once failAfter bytes were written.
type testDirSink struct {
	dir       string
	failAfter int64
	failOn    string // an image whose Close fails
	readFrom  bool   // its writers read for themselves (io.ReaderFrom), as the pack's do
	written   int64
}

func (s *testDirSink) Create(name string) (io.WriteCloser, error) {
	f, err := os.OpenFile(filepath.Join(s.dir, name), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	if s.readFrom {
		return &readingWriter{failingWriter{f: f, s: s}}, nil
	}
	return &failingWriter{f: f, s: s}, nil
}

// readingWriter reads the image itself, in pieces of 100 KiB, as Write would have been given them.
type readingWriter struct{ failingWriter }

func (w *readingWriter) ReadFrom(r io.Reader) (int64, error) {
	var n int64
	b := make([]byte, 100<<10)
	for {
		k, err := io.ReadFull(r, b)
		if k > 0 {
			if _, werr := w.Write(b[:k]); werr != nil {
				return n, werr
			}
			n += int64(k)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

type failingWriter struct {
	f *os.File
	s *testDirSink
}

func (w *failingWriter) Write(p []byte) (int, error) {
	if w.s.failAfter > 0 && w.s.written+int64(len(p)) > w.s.failAfter {
		return 0, errors.New("test sink: disk full")
	}
	w.s.written += int64(len(p))
	return w.f.Write(p)
}

func (w *failingWriter) Close() error {
	if w.s.failOn != "" && filepath.Base(w.f.Name()) == w.s.failOn {
		w.f.Close()
		return errors.New("test sink: disk full at the end")
	}
	return w.f.Close()
}

// testDirSource is a test helper: an ImageSource reading plain files from a directory.
type testDirSource struct{ dir string }

func (s testDirSource) Open(name string) (io.ReadCloser, error) {
	return os.Open(filepath.Join(s.dir, name))
}

func (s testDirSource) Names() []string {
	es, _ := os.ReadDir(s.dir)
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

// buildCounter builds the agent's counter test app.
func buildCounter(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "counter")
	cmd := exec.Command("go", "build", "-o", bin, "../agent/testdata/counter")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	return bin
}

// shellContainer runs script as PID 1 (sh) of new PID and mount namespaces and returns the Join
// of that sh.
func shellContainer(t *testing.T, script string) Join {
	t.Helper()
	// Descriptors the test inherited (a shell's fd 10 on /dev/null of the host's mounts) would
	// reach the app and fail its dump: CRIU cannot find their mount in the container.
	for fd := 3; fd < 1024; fd++ {
		unix.CloseOnExec(fd)
	}
	cmd := exec.Command("unshare", "--pid", "--mount", "--fork", "--mount-proc", "sh", "-c", script)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		for _, p := range Descendants(cmd.Process.Pid) {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
		_ = cmd.Wait()
	})
	for i := 0; i < 500; i++ {
		if ch := Children(cmd.Process.Pid); len(ch) > 0 {
			st, err := StartTime(ch[0])
			require.NoError(t, err)
			return Join{PID: ch[0], StartTime: st}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("unshare started no child")
	return Join{}
}

// lastNumber is the last number the counter appended to its file.
func lastNumber(t *testing.T, file string) int {
	t.Helper()
	b, err := os.ReadFile(file)
	if errors.Is(err, fs.ErrNotExist) {
		return 0
	}
	require.NoError(t, err)
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	n, err := strconv.Atoi(f[len(f)-1])
	require.NoError(t, err)
	return n
}

func waitNumber(t *testing.T, file string, atLeast int) int {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if n := lastNumber(t, file); n >= atLeast {
			return n
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("the counter did not reach %d (last %d)", atLeast, lastNumber(t, file))
	return 0
}

// counterIn starts the counter (64 MiB touched: the pages image takes the sink's lane) under a
// shell that is PID 1 of a new container, and returns the container and the counter's PIDs (in
// the host and in the container). Forked helpers first push the counter's PID past whatever
// CRIU and its helpers take in the container that restores it.
func counterIn(t *testing.T, bin, file string, flags ...string) (Join, int, int) {
	t.Helper()
	j := shellContainer(t, fmt.Sprintf("exec </dev/null >/dev/null 2>&1; for i in $(seq 40); do /bin/true; done; setsid %s %s %s </dev/null >/dev/null 2>&1 & wait", bin, strings.Join(append([]string{"-touch-mib", "64", "-tick", "20ms"}, flags...), " "), file))
	var host int
	for i := 0; i < 500 && host == 0; i++ {
		for _, c := range Children(j.PID) {
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", c)); strings.TrimSpace(string(comm)) == "counter" {
				host = c
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	require.NotZero(t, host, "the counter did not start")
	waitNumber(t, file, 1)
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", host))
	require.NoError(t, err)
	ns := strings.Fields(statusOf(string(st))["NSpid"])
	inCtr, err := strconv.Atoi(ns[len(ns)-1])
	require.NoError(t, err)
	return j, host, inCtr
}

func openDir(t *testing.T, p string) *os.File {
	t.Helper()
	require.NoError(t, os.MkdirAll(p, 0o700))
	d, err := os.Open(p)
	require.NoError(t, err)
	t.Cleanup(func() { d.Close() })
	return d
}

// A counter dumped through the streamer into a sink, killed, and restored through the streamer
// from those images in another container, continues its sequence.
func TestStreamDumpRestore(t *testing.T) {
	for _, readFrom := range []bool{false, true} {
		t.Run(fmt.Sprintf("sink-reads-for-itself=%v", readFrom), func(t *testing.T) { testStreamDumpRestore(t, readFrom) })
	}
}

func testStreamDumpRestore(t *testing.T, readFrom bool) {
	b := testBundle(t)
	bin := buildCounter(t)
	base := t.TempDir()
	file := filepath.Join(base, "count.txt")
	j, host, inCtr := counterIn(t, bin, file)

	images := openDir(t, filepath.Join(base, "images"))
	logs := openDir(t, filepath.Join(base, "logs"))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, err := DumpStreamed(ctx, DumpOptions{Bundle: b, Join: j, Pid: inCtr, ImagesDir: logs, LogFile: "dump.log", LogLevel: 4},
		openDir(t, filepath.Join(base, "stream-dump")), &testDirSink{dir: images.Name(), readFrom: readFrom})
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(logs.Name(), "dump.log"))
		t.Fatalf("dump: %v\n%s", err, log[max(0, len(log)-3000):])
	}
	assert.Greater(t, st.Bytes, int64(64<<20), "the 64 MiB of pages went through the stream")
	pages, _ := filepath.Glob(filepath.Join(images.Name(), "pages-*.img"))
	require.NotEmpty(t, pages, "CRIU streamed its pages images")
	_, err = os.Stat(filepath.Join(logs.Name(), "dump.log"))
	assert.NoError(t, err, "CRIU's log goes to the work directory")
	_, err = os.Stat(filepath.Join(logs.Name(), "stats-dump"))
	assert.NoError(t, err, "CRIU 4.2 writes stats-dump as a file in its work directory, streaming or not")
	_, err = os.Stat(filepath.Join(images.Name(), "inventory.img"))
	assert.NoError(t, err, "the small images went through the stream too")
	entries, _ := os.ReadDir(filepath.Join(base, "stream-dump"))
	assert.Empty(t, entries, "nothing is left in the stream directory, the socket is gone")
	stopped := lastNumber(t, file)
	time.Sleep(200 * time.Millisecond)
	assert.Equal(t, stopped, lastNumber(t, file), "the dump left the counter stopped")
	require.NoError(t, syscall.Kill(host, syscall.SIGKILL))

	k := shellContainer(t, "sleep 600")
	work := openDir(t, filepath.Join(base, "work"))
	pid, rst, err := RestoreStreamed(ctx, RestoreOptions{Bundle: b, Join: k, WorkDir: work, LogFile: "restore.log"},
		openDir(t, filepath.Join(base, "stream-restore")), testDirSource{dir: images.Name()})
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(work.Name(), "restore.log"))
		t.Fatalf("restore: %v\n%s", err, log[max(0, len(log)-3000):])
	}
	assert.Equal(t, inCtr, pid, "the restored root has its PID in the container")
	assert.Equal(t, st.Bytes, rst.Bytes, "every byte dumped was served")
	var restored int
	for _, c := range Children(k.PID) {
		restored = c
	}
	require.NotZero(t, restored, "the restored counter is a child of the container's PID 1")
	require.NoError(t, SignalTree(restored, syscall.SIGCONT))
	waitNumber(t, file, stopped+3)
	b2, _ := os.ReadFile(file)
	assert.NotContains(t, "\n"+string(b2), "\n1\n2\n3\n1\n", "no cold start")
	_, err = os.Stat(filepath.Join(base, "stream-restore", ServeSocket))
	assert.True(t, errors.Is(err, fs.ErrNotExist), "the socket is gone after the restore")
}

// A sink that fails in the middle of the pages fails the dump, promptly, and the counter
// carries on (CRIU thaws the tree of a failed dump).
func TestStreamDumpSinkFails(t *testing.T) {
	for _, readFrom := range []bool{false, true} {
		t.Run(fmt.Sprintf("sink-reads-for-itself=%v", readFrom), func(t *testing.T) { testStreamDumpSinkFails(t, readFrom) })
	}
}

func testStreamDumpSinkFails(t *testing.T, readFrom bool) {
	b := testBundle(t)
	bin := buildCounter(t)
	base := t.TempDir()
	file := filepath.Join(base, "count.txt")
	j, _, inCtr := counterIn(t, bin, file)
	logs := openDir(t, filepath.Join(base, "logs"))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	_, err := DumpStreamed(ctx, DumpOptions{Bundle: b, Join: j, Pid: inCtr, ImagesDir: logs, LogFile: "dump.log", LogLevel: 4},
		openDir(t, filepath.Join(base, "stream")), &testDirSink{dir: openDir(t, filepath.Join(base, "images")).Name(), failAfter: 16 << 20, readFrom: readFrom})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "disk full")
	assert.Equal(t, 1, strings.Count(err.Error(), "disk full"), "said once: %v", err)
	assert.ErrorIs(t, err, ErrImageStream)
	assert.Less(t, time.Since(start), streamGrace, "CRIU stopped by itself, it was not killed after the grace")
	n := lastNumber(t, file)
	waitNumber(t, file, n+3)
}

// A sink that fails after CRIU has finished (the last image, inventory.img, cannot be kept) fails
// the dump with ErrStreamAfterCriu: CRIU left the tree stopped as after a successful dump, and
// it is the caller's to thaw.
func TestStreamDumpSinkFailsAfterCriu(t *testing.T) {
	b := testBundle(t)
	bin := buildCounter(t)
	base := t.TempDir()
	file := filepath.Join(base, "count.txt")
	j, host, inCtr := counterIn(t, bin, file)
	logs := openDir(t, filepath.Join(base, "logs"))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, err := DumpStreamed(ctx, DumpOptions{Bundle: b, Join: j, Pid: inCtr, ImagesDir: logs, LogFile: "dump.log", LogLevel: 4},
		openDir(t, filepath.Join(base, "stream")), &testDirSink{dir: openDir(t, filepath.Join(base, "images")).Name(), failOn: "inventory.img"})
	require.ErrorIs(t, err, ErrStreamAfterCriu)
	assert.Contains(t, err.Error(), "disk full at the end")
	n := lastNumber(t, file)
	time.Sleep(200 * time.Millisecond)
	assert.Equal(t, n, lastNumber(t, file), "left stopped")
	require.NoError(t, SignalTree(host, syscall.SIGCONT))
	waitNumber(t, file, n+3)
}

// A cancelled context stops a restore whose source blocks: an error, not a hang.
func TestStreamRestoreCancelled(t *testing.T) {
	b := testBundle(t)
	base := t.TempDir()
	k := shellContainer(t, "sleep 600")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	start := time.Now()
	_, _, err := RestoreStreamed(ctx, RestoreOptions{Bundle: b, Join: k, WorkDir: openDir(t, filepath.Join(base, "work")), LogFile: "restore.log"},
		openDir(t, filepath.Join(base, "stream")), blockingSource{})
	require.Error(t, err)
	assert.Less(t, time.Since(start), 20*time.Second)
}

// blockingSource is a test helper: an ImageSource whose every image blocks until it is closed.
type blockingSource struct{}

func (blockingSource) Open(string) (io.ReadCloser, error) {
	return &blockReader{closed: make(chan struct{})}, nil
}
func (blockingSource) Names() []string { return nil }

type blockReader struct {
	closed chan struct{}
	once   sync.Once
}

func (r *blockReader) Read([]byte) (int, error) {
	<-r.closed
	return 0, os.ErrClosed
}

func (r *blockReader) Close() error {
	r.once.Do(func() { close(r.closed) })
	return nil
}
