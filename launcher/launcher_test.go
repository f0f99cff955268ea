package launcher

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/criurun"
)

// TestMain lets a test run this binary as a ticking app (STASIS_TEST_TICKS=file): one process
// appending a line every 50 ms, with no children.
func TestMain(m *testing.M) {
	if path := os.Getenv("STASIS_TEST_TICKS"); path != "" {
		for {
			f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
			if err != nil {
				os.Exit(3)
			}
			_, _ = f.WriteString("x\n")
			f.Close()
			time.Sleep(50 * time.Millisecond)
		}
	}
	os.Exit(m.Run())
}

func TestCombineEntrypoint(t *testing.T) {
	tests := []struct {
		name string
		ep   agentapi.Entrypoint
		args []string
		want []string
		err  string
	}{
		{"entrypoint + cmd", agentapi.Entrypoint{Entrypoint: []string{"/app"}, Cmd: []string{"--serve"}}, nil, []string{"/app", "--serve"}, ""},
		{"args replace cmd", agentapi.Entrypoint{Entrypoint: []string{"/app"}, Cmd: []string{"--serve"}}, []string{"--once"}, []string{"/app", "--once"}, ""},
		{"cmd only", agentapi.Entrypoint{Cmd: []string{"sh", "-c", "x"}}, nil, []string{"sh", "-c", "x"}, ""},
		{"args only", agentapi.Entrypoint{}, []string{"/bin/true"}, []string{"/bin/true"}, ""},
		{"nothing", agentapi.Entrypoint{}, nil, nil, "no ENTRYPOINT or CMD"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := CombineEntrypoint(tt.ep, tt.args)
			if tt.err != "" {
				assert.ErrorContains(t, err, tt.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

// The launcher keeps the PIDs below ReservedPIDs for itself and the agent's restore: after
// reservePIDs, the next process of the namespace gets a PID above them. (Run in a fresh PID
// namespace, where PIDs start low: `unshare --pid --fork` re-runs this test binary.)
func TestReservePIDs(t *testing.T) {
	if os.Getenv("STASIS_TEST_IN_PIDNS") == "" {
		if os.Geteuid() != 0 {
			t.Skip("needs root for a PID namespace")
		}
		out, err := exec.Command("unshare", "--pid", "--fork", "--", "env", "STASIS_TEST_IN_PIDNS=1",
			os.Args[0], "-test.run", "^TestReservePIDs$", "-test.v").CombinedOutput()
		require.NoError(t, err, "%s", out)
		assert.Contains(t, string(out), "--- PASS: TestReservePIDs")
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, "reserving") {
				t.Log(strings.TrimSpace(l))
			}
		}
		return
	}
	start := time.Now()
	require.NoError(t, reservePIDs())
	took := time.Since(start)
	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	t.Logf("reserving %d PIDs took %s; next PID %d", ReservedPIDs, took, cmd.Process.Pid)
	assert.Greater(t, cmd.Process.Pid, ReservedPIDs)
}

// The launcher's watchdog resumes an app left stopped (an agent gone for good after a dump) once
// the limit has passed, unless the pod is being deleted (SIGTERM seen).
func TestFreezeWatchdog(t *testing.T) {
	out := filepath.Join(t.TempDir(), "ticks")
	// An app without children: a shell loop forks `sleep`, and a child forked between the listing
	// of the tree and the SIGSTOP runs on and exits; its exit makes the kernel send SIGHUP and
	// SIGCONT to the app's orphaned, stopped process group (the app runs in a session of its own),
	// and the SIGHUP ends the shell.
	t.Setenv("STASIS_TEST_TICKS", out)
	pid, err := startApp([]string{os.Args[0]})
	os.Unsetenv("STASIS_TEST_TICKS")
	require.NoError(t, err)
	// Long enough for the test to see the stop on a loaded machine before the watchdog ends it.
	s := &supervisor{log: zerolog.Nop(), sigs: make(chan os.Signal, 1), watchdog: 8 * time.Second}
	done := make(chan int, 1)
	go func() { done <- s.supervise(pid) }()
	t.Cleanup(func() { _ = criurun.SignalTree(pid, syscall.SIGKILL); <-done })

	size := func() int64 {
		if fi, err := os.Stat(out); err == nil {
			return fi.Size()
		}
		return 0
	}
	// Bounds, not speed assertions: the unit tier runs beside the agent's CRIU tests on 2 cores.
	require.Eventually(t, func() bool { return size() > 0 }, 30*time.Second, 10*time.Millisecond, "the app runs")
	require.NoError(t, criurun.SignalTree(pid, syscall.SIGSTOP)) // as a dump leaves it
	require.Eventually(t, func() bool { return Stopped(pid) }, 30*time.Second, 10*time.Millisecond)
	stoppedAt := size()
	require.Eventually(t, func() bool { return !Stopped(pid) && size() > stoppedAt }, 30*time.Second, 50*time.Millisecond,
		"the watchdog resumes the app and it runs on")
}
