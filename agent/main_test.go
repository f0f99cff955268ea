package agent

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/criurun"
)

// Binaries built once for the whole package: the stasis binary (launcher, restore-prepare) and the
// counter test app.
var (
	stasisBin  string
	counterBin string
	callerBin  string // testdata/localcaller: a launcher-like client of the local socket
	buildErr   error
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "stasis-agent-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Executable by every user: some test containers run as uid 1000.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	stasisBin = filepath.Join(dir, "stasis")
	guardBinary = stasisBin // the agent's own binary is this test binary: the guard is stasis's
	counterBin = filepath.Join(dir, "counter")
	callerBin = filepath.Join(dir, "localcaller")
	for _, b := range [][2]string{{stasisBin, "github.com/stasis-k8s/stasis"}, {counterBin, "./testdata/counter"}, {callerBin, "./testdata/localcaller"}} {
		cmd := exec.Command("go", "build", "-o", b[0], b[1])
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build %s: %v\n%s", b[1], err, out)
		}
	}
	// The binaries play image files: older than any container a test starts may compute its own
	// start to be (the kernel gives its boot time in whole seconds), so they are never carried.
	time.Sleep(1100 * time.Millisecond)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// needCriu returns the CRIU wrapper the tests use, failing (not skipping) when it is missing.
func needCriu(t testing.TB) string {
	t.Helper()
	require.NoError(t, buildErr)
	if os.Geteuid() != 0 {
		t.Fatal("these tests dump real processes with CRIU and must run as root")
	}
	p := os.Getenv("STASIS_CRIU")
	if p == "" {
		t.Fatal("STASIS_CRIU not set: run `make unit` (it installs CRIU 4.x with hack/criu/install.sh and sets STASIS_CRIU)")
	}
	if _, _, err := criurun.CheckVersion(p); err != nil {
		t.Fatalf("STASIS_CRIU=%s: %v", p, err)
	}
	return p
}

// restrictedContainer is how the tests start a wired container: as a pod of Pod Security
// "restricted" runs (drop ALL, no_new_privs), with no capability at all in its bounding set: the
// launcher needs none, the agent does the privileged work.
var restrictedContainer = []string{"setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--no-new-privs", "--"}

// nonRootContainer is restrictedContainer with runAsUser and runAsGroup 1000 (no supplementary
// groups), as most pods of Pod Security "restricted" run.
var nonRootContainer = append([]string{"setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"}, restrictedContainer[1:]...)

// container is `stasis launcher -- CMD` as PID 1 of fresh mount, PID, UTS and IPC namespaces with
// its own /proc and the capabilities of a wired container: what containerd would start.
type container struct {
	t      testing.TB
	cmd    *exec.Cmd
	out    *syncBuffer
	done   chan struct{}
	status syscall.WaitStatus
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startContainer(t testing.TB, env []string, launcherArgs ...string) *container {
	t.Helper()
	return startContainerIn(t, "", env, launcherArgs...)
}

// startContainerIn is startContainer with the container's processes in cgroup (a directory of a
// cgroup hierarchy; "" for the test's own), joined before the namespaces are created, as the
// runtime does.
func startContainerIn(t testing.TB, cgroup string, env []string, launcherArgs ...string) *container {
	t.Helper()
	return startContainerWith(t, cgroup, restrictedContainer, env, launcherArgs...)
}

// startContainerWith starts the container with the given setpriv prefix (none: every capability
// of the test, as a privileged pod).
func startContainerWith(t testing.TB, cgroup string, setpriv []string, env []string, launcherArgs ...string) *container {
	t.Helper()
	args := append([]string{"--mount", "--pid", "--uts", "--ipc", "--fork", "--mount-proc", "--"}, setpriv...)
	args = append(args, stasisBin, "launcher")
	args = append(args, launcherArgs...)
	cmd := exec.Command("unshare", args...)
	if cgroup != "" {
		cmd = exec.Command("sh", append([]string{"-c", `echo $$ > "$0/cgroup.procs" && exec unshare "$@"`, cgroup}, args...)...)
	}
	c := &container{t: t, cmd: cmd, out: &syncBuffer{}, done: make(chan struct{})}
	c.cmd.Env = append(os.Environ(), env...)
	// Pipes for stdio, as containerd gives containers (stdin stays open and empty).
	c.cmd.Stdout, c.cmd.Stderr = c.out, c.out
	stdinR, stdinW, err := os.Pipe()
	require.NoError(t, err)
	c.cmd.Stdin = stdinR
	require.NoError(t, c.cmd.Start())
	stdinR.Close()
	t.Cleanup(func() { stdinW.Close() })
	go func() {
		_ = c.cmd.Wait()
		c.status = c.cmd.ProcessState.Sys().(syscall.WaitStatus)
		close(c.done)
	}()
	t.Cleanup(func() {
		select {
		case <-c.done:
		default:
			// The launcher first: as PID 1 of the container it takes every process in it along.
			if ch := criurun.Children(c.cmd.Process.Pid); len(ch) > 0 {
				_ = syscall.Kill(ch[0], syscall.SIGKILL)
			}
			_ = c.cmd.Process.Kill()
			select {
			case <-c.done:
			case <-time.After(30 * time.Second):
				t.Errorf("container did not go away after SIGKILL")
			}
		}
		if t.Failed() {
			t.Logf("container output:\n%s", c.out.String())
		}
	})
	return c
}

// waitOutput waits until the container printed s (the launcher logs after the agent answered,
// when the app may already be running again); bounded so a broken launcher fails the test.
func (c *container) waitOutput(s string) {
	c.t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(c.out.String(), s) {
		if time.Now().After(deadline) {
			c.t.Fatalf("the container never printed %q; output:\n%s", s, c.out.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// launcherPID is the host PID of the container's PID 1 (unshare's child).
func (c *container) launcherPID() int {
	for i := 0; i < 200; i++ {
		if ch := criurun.Children(c.cmd.Process.Pid); len(ch) > 0 {
			return ch[0]
		}
		select {
		case <-c.done:
			return 0
		case <-time.After(10 * time.Millisecond):
		}
	}
	return 0
}

// stop sends SIGTERM to the container's PID 1, as the kubelet does on pod deletion, and returns
// the launcher's exit code (unshare exits with its child's status).
func (c *container) stop() int {
	c.t.Helper()
	p := c.launcherPID()
	require.NotZero(c.t, p, "launcher not running")
	require.NoError(c.t, syscall.Kill(p, syscall.SIGTERM))
	select {
	case <-c.done:
	case <-time.After(30 * time.Second):
		c.t.Fatalf("container did not exit after SIGTERM; output:\n%s", c.out.String())
	}
	return c.status.ExitStatus()
}

// testKey signs the manifests of the agents in these tests.
var testKey = checkpoint.Key("stasis test manifest key, 32 bytes or more")

// agentCriu is the bundle of the CRIU wrapper the tests use: the agent's own CRIU.
func agentCriu(t testing.TB, wrapper string) criurun.Bundle {
	t.Helper()
	b, err := criurun.BundleOf(wrapper)
	require.NoError(t, err)
	return b
}

// pidFinder finds containers by the launcher PIDs the test started (the CRI finder's stand-in
// where no container runtime runs: the lookup is the only part replaced, the dump is the agent's).
type pidFinder map[string]int

func (f pidFinder) Find(_ context.Context, _ agentapi.PodRef, container string) (Target, error) {
	p, ok := f[container]
	if !ok || p == 0 {
		return Target{}, fmt.Errorf("no such container %q", container)
	}
	return Target{PID: p, Image: "counter:test"}, nil
}

// readCounts returns the numbers in a counter file.
func readCounts(t testing.TB, path string) []int {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	var out []int
	for _, l := range strings.Fields(string(b)) {
		n, err := strconv.Atoi(l)
		require.NoError(t, err, "counter file %s: %q", path, b)
		out = append(out, n)
	}
	return out
}

// waitCount waits until the counter file holds at least n numbers (bounded by a generous limit so
// a broken app fails the test instead of hanging it; not a timing assertion).
func waitCount(t testing.TB, c *container, path string, n int) []int {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if got := readCounts(t, path); len(got) >= n {
			return got
		}
		select {
		case <-c.done:
			t.Fatalf("container exited (status %v) before counting to %d; output:\n%s", c.status, n, c.out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("counter %s did not reach %d numbers; output:\n%s", path, n, c.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}
