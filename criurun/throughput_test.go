package criurun

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// testDiscardSink is a test helper: an ImageSink that keeps nothing (the streamer's own cost).
type testDiscardSink struct{}

func (testDiscardSink) Create(string) (io.WriteCloser, error) { return nopWriteCloser{io.Discard}, nil }

type nopWriteCloser struct{ io.Writer }

func (nopWriteCloser) Close() error { return nil }

// TestStreamThroughput (STASIS_STREAM_BENCH=1) prints how long a streamed dump of 1 GiB of random
// memory takes into a sink that keeps nothing: the streamer's own pace.
func TestStreamThroughput(t *testing.T) {
	if os.Getenv("STASIS_STREAM_BENCH") == "" {
		t.Skip("set STASIS_STREAM_BENCH=1")
	}
	b := testBundle(t)
	bin := buildCounter(t)
	base := t.TempDir()
	file := filepath.Join(base, "count.txt")
	j, host, inCtr := counterIn(t, bin, file, "-touch-mib", "1024", "-random", "-tick", "1h")
	for i := 0; i < 3; i++ {
		logs := openDir(t, filepath.Join(base, "logs"))
		t0 := time.Now()
		st, err := DumpStreamed(context.Background(), DumpOptions{Bundle: b, Join: j, Pid: inCtr, ImagesDir: logs, LogFile: "dump.log", LogLevel: 2},
			openDir(t, filepath.Join(base, "stream")), testDiscardSink{})
		require.NoError(t, err)
		d := time.Since(t0)
		t.Logf("streamed %d MiB in %.2f s: %.2f GiB/s", st.Bytes>>20, d.Seconds(), float64(st.Bytes)/(1<<30)/d.Seconds())
		require.NoError(t, SignalTree(host, syscall.SIGCONT))
	}
	// The same through a sink and a source of plain files in memory (/dev/shm): the restore's pace.
	shm, err := os.MkdirTemp("/dev/shm", "stasis-stream-")
	require.NoError(t, err)
	defer os.RemoveAll(shm)
	_, err = DumpStreamed(context.Background(), DumpOptions{Bundle: b, Join: j, Pid: inCtr, ImagesDir: openDir(t, filepath.Join(base, "logs")), LogFile: "dump.log", LogLevel: 2},
		openDir(t, filepath.Join(base, "stream")), &testDirSink{dir: shm})
	require.NoError(t, err)
	require.NoError(t, syscall.Kill(host, syscall.SIGKILL))
	for i := 0; i < 2; i++ {
		k := shellContainer(t, "sleep 600")
		t0 := time.Now()
		_, st, err := RestoreStreamed(context.Background(), RestoreOptions{Bundle: b, Join: k, WorkDir: openDir(t, filepath.Join(base, "work")), LogFile: "restore.log"},
			openDir(t, filepath.Join(base, "stream")), testDirSource{dir: shm})
		require.NoError(t, err)
		d := time.Since(t0)
		t.Logf("restore streamed %d MiB in %.2f s: %.2f GiB/s", st.Bytes>>20, d.Seconds(), float64(st.Bytes)/(1<<30)/d.Seconds())
		for _, c := range Children(k.PID) {
			_ = SignalTree(c, syscall.SIGKILL)
		}
		os.Remove(filepath.Join(base, "work", "restore.pid"))
	}
}
