package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/criurun"
)

// ipcState is one line of ipcapp's state file.
type ipcState struct {
	token string
	n     map[string]uint64 // round replies events signals memfd forked echo
}

func readIPCStates(t testing.TB, path string) (states []ipcState, errors []string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	require.NoError(t, err)
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if strings.HasPrefix(l, "ERROR") {
			errors = append(errors, l)
			continue
		}
		s := ipcState{n: map[string]uint64{}}
		for _, f := range strings.Fields(l) {
			k, v, _ := strings.Cut(f, "=")
			if k == "token" {
				s.token = v
				continue
			}
			n, err := strconv.ParseUint(v, 10, 64)
			require.NoError(t, err, "state line %q", l)
			s.n[k] = n
		}
		states = append(states, s)
	}
	return states, errors
}

// waitRound waits until the app's state file reached round n and returns every state.
func waitRound(t testing.TB, c *container, path string, n uint64) []ipcState {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		states, _ := readIPCStates(t, path)
		if len(states) > 0 && states[len(states)-1].n["round"] >= n {
			return states
		}
		select {
		case <-c.done:
			t.Fatalf("container exited before round %d; output:\n%s", n, c.out.String())
		default:
		}
		if time.Now().After(deadline) {
			procs := treeFds(c)
			b, _ := os.ReadFile(path)
			if len(b) > 400 {
				b = b[len(b)-400:]
			}
			t.Fatalf("ipcapp never reached round %d; tree:\n%s\nstate file ends:\n%s\noutput:\n%s", n, strings.Join(procs, "\n"), b, c.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A tree whose state lives in kernel objects (pipes between processes, an exec'd and a forked
// child, timerfd, eventfd, epoll, signalfd, an anonymous shared mapping shared across fork, a
// memfd mapped by two processes) is dumped and restored into a new container: every object
// carries on where it was (the app checks each answer itself and logs ERROR otherwise).
func TestIPCStateContinues(t *testing.T) {
	testIPCState(t, restrictedContainer)
}

// SysV shared memory lives in the pod's IPC namespace: the dump takes the namespace along (CRIU
// refuses a tree attached to a segment otherwise), and the restored tree finds its segment, with
// its contents, in a private IPC namespace of the new container.
// Also for a non-root app (as PostgreSQL runs), which this VM dumps as the app's user.
func TestSysVSharedMemoryContinues(t *testing.T) {
	for _, tt := range []struct {
		name    string
		setpriv []string
	}{{"root", restrictedContainer}, {"uid 1000", nonRootContainer}} {
		t.Run(tt.name, func(t *testing.T) {
			restored := testIPCState(t, tt.setpriv, "-sysv")
			objs, err := sysvObjects(restored)
			require.NoError(t, err)
			assert.Equal(t, 1, objs.shm, "the segment is in the restored tree's IPC namespace: %v", objs)
		})
	}
}

// testIPCState runs ipcapp with args in containers started with setpriv through dump and
// restore, checks its state, and returns the restored app's host PID (still running).
func testIPCState(t *testing.T, setpriv []string, args ...string) int {
	app := testApp(t, "ipcapp")
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	r.setpriv = setpriv
	r.serveLocal()
	work := t.TempDir()
	for _, d := range []string{filepath.Dir(r.socket), r.root, filepath.Dir(app)} {
		openToAll(t, d, 0o755) // for a non-root app
	}
	openToAll(t, work, 0o777)
	state := filepath.Join(work, "state.txt")
	cmd := append([]string{app, "-state", state}, args...)
	c := startContainerWith(t, "", setpriv, r.env("app"), append([]string{"--"}, cmd...)...)
	r.finder["app"] = c.launcherPID()
	waitRound(t, c, state, 20)
	root, err := appRoot(r.finder["app"])
	require.NoError(t, err)
	require.Len(t, criurun.Descendants(root), 3, "the app and its two children")

	st := r.checkpoint("uid-ipc", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	id := st.Containers[0].CheckpointID
	m, err := checkpoint.ReadManifest(filepath.Join(r.dir("app"), id))
	require.NoError(t, err)
	assert.Equal(t, slices.Contains(args, "-sysv"), m.IPCNamespace, "the manifest says whether the IPC namespace travelled")
	before, _ := readIPCStates(t, state)
	dumped := before[len(before)-1]
	assert.Equal(t, 143, c.stop())

	c2 := r.restoreContainer("app", id, cmd...)
	c2.waitOutput("restored; supervising the restored tree")
	states := waitRound(t, c2, state, dumped.n["round"]+50)
	_, errs := readIPCStates(t, state)
	assert.Empty(t, errs, "the app found no wrong answer")
	restored, err := appRoot(c2.launcherPID())
	require.NoError(t, err)
	assert.Len(t, criurun.Descendants(restored), 3, "both children restored")

	for i, s := range states {
		require.Equal(t, dumped.token, s.token, "line %d: the same process state (a cold start draws a new token)", i+1)
		require.Equal(t, uint64(i+1), s.n["round"], "line %d: rounds continue without reset or gap", i+1)
		if v, ok := s.n["sysv"]; ok {
			require.Equal(t, s.n["round"], v, "line %d: the SysV segment's counter continues with its contents", i+1)
		}
	}
	last := states[len(states)-1]
	round := last.n["round"]
	t.Logf("dumped at %v, now %v", dumped.n, last.n)
	for _, k := range []string{"replies", "events", "signals"} {
		assert.GreaterOrEqual(t, last.n[k]+2, round, "%s keep up with the rounds: %v", k, last.n)
		assert.Greater(t, last.n[k], dumped.n[k], "%s continue after the restore", k)
	}
	assert.GreaterOrEqual(t, last.n["memfd"], last.n["replies"], "the pipe child writes the memfd before it answers")
	assert.Greater(t, last.n["memfd"], dumped.n["memfd"], "the memfd is shared by both restored processes")
	assert.Greater(t, last.n["forked"], dumped.n["forked"], "the forked child runs on in the shared anonymous mapping")
	echo := last.n["echo"]
	assert.True(t, echo%3 == 0 && echo/3+3 >= round && echo/3 <= round, "the forked child sees the parent's rounds: echo %d at round %d", echo, round)
	if len(args) > 0 {
		require.Equal(t, uint64(len(states)), last.n["sysv"], "the SysV counter was read after the restore")
		restoredNS, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/ipc", restored))
		podNS, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/ipc", c2.launcherPID()))
		assert.NotEqual(t, podNS, restoredNS, "the restored tree has a private IPC namespace")
	}
	return restored
}

// treeFds describes the app's processes and their open files (fdinfo included), for a failure.
func treeFds(c *container) []string {
	var procs []string
	root, err := appRoot(c.launcherPID())
	if err != nil {
		return nil
	}
	for _, p := range criurun.Descendants(root) {
		st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
		wchan, _ := os.ReadFile(fmt.Sprintf("/proc/%d/wchan", p))
		procs = append(procs, fmt.Sprintf("%s wchan=%s", st, wchan))
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p))
		for _, fd := range fds {
			l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", p, fd.Name()))
			info, _ := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", p, fd.Name()))
			procs = append(procs, fmt.Sprintf("  fd %s -> %s\n%s", fd.Name(), l, info))
		}
	}
	return procs
}
