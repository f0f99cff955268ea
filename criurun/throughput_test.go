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
}
