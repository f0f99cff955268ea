package criurun

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// testBundle is the bundle of $STASIS_CRIU (hack/criu/install.sh), needed by the tests that run it.
func testBundle(t *testing.T) Bundle {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("these tests join namespaces and switch users: they must run as root")
	}
	w := os.Getenv("STASIS_CRIU")
	if w == "" {
		t.Fatal("STASIS_CRIU not set: run `make unit` (it installs the CRIU bundle with hack/criu/install.sh)")
	}
	b, err := BundleOf(w)
	require.NoError(t, err)
	return b
}

// testContainer starts a process in new PID and mount namespaces with its own /proc and returns its
// Join (a stand-in for a container's PID 1).
func testContainer(t *testing.T) Join {
	t.Helper()
	cmd := exec.Command("unshare", "--pid", "--mount", "--fork", "--mount-proc", "sleep", "600")
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
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

// runPreloaded runs a system program (its libc is the bundle's) the way Bundle.Run runs CRIU: the
// bundle's loader, nsjoin.so preloaded, the namespaces of j as fds, cred as STASIS_NSJOIN_CRED
// (none: unset).
// The program's /proc/self is the process nsjoin.so's constructor prepared.
func runPreloaded(t *testing.T, b Bundle, j Join, cred []string, argv ...string) (stdout, stderr string, code int) {
	t.Helper()
	ns, err := openNamespaces(j)
	require.NoError(t, err)
	var list []string
	for i, f := range ns {
		defer f.Close()
		list = append(list, strconv.Itoa(3+i))
	}
	args := append([]string{filepath.Join(b.Dir, bundleLoader), "--preload", filepath.Join(b.Dir, bundleNsJoin),
		"--library-path", filepath.Join(b.Dir, bundleLibs) + ":" + filepath.Join(b.Dir, bundleLibs2)}, argv...)
	env := []string{"STASIS_NSJOIN=" + strings.Join(list, ",")}
	for _, c := range cred {
		env = append(env, "STASIS_NSJOIN_CRED="+c)
	}
	var out, errb bytes.Buffer
	cmd := &exec.Cmd{Path: args[0], Args: args, ExtraFiles: ns, Stdout: &out, Stderr: &errb, Env: env}
	err = cmd.Run()
	if _, ok := err.(*exec.ExitError); !ok {
		require.NoError(t, err)
	}
	return out.String(), errb.String(), cmd.ProcessState.ExitCode()
}

// statusOf parses /proc/<pid>/status text.
func statusOf(s string) map[string]string {
	out := map[string]string{}
	for _, l := range strings.Split(s, "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			out[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	return out
}

// STASIS_NSJOIN_CRED: the program preloaded with nsjoin.so runs inside the container's namespaces
// as the given user, with exactly the dump capabilities effective and permitted, nothing
// inheritable or ambient, the bounding set untouched, and the variable gone from its environment.
func TestNsJoinCred(t *testing.T) {
	b := testBundle(t)
	j := testContainer(t)
	out, errs, code := runPreloaded(t, b, j, []string{"1000:2000"}, "/bin/cat", "/proc/self/status")
	require.Equal(t, 0, code, "stderr: %s", errs)
	st := statusOf(out)
	assert.Equal(t, "1000 1000 1000 1000", st["Uid"])
	assert.Equal(t, "2000 2000 2000 2000", st["Gid"])
	assert.Equal(t, "", st["Groups"], "no supplementary group")
	var want uint64
	for _, c := range []int{unix.CAP_CHECKPOINT_RESTORE, unix.CAP_SYS_PTRACE, unix.CAP_SYS_ADMIN, unix.CAP_SYS_CHROOT,
		unix.CAP_DAC_OVERRIDE, unix.CAP_DAC_READ_SEARCH, unix.CAP_FOWNER, unix.CAP_KILL, unix.CAP_SETUID,
		unix.CAP_SETGID, unix.CAP_NET_ADMIN} {
		want |= 1 << c
	}
	assert.Equal(t, fmt.Sprintf("%016x", want), st["CapEff"])
	assert.Equal(t, fmt.Sprintf("%016x", want), st["CapPrm"])
	assert.Equal(t, "0000000000000000", st["CapInh"])
	assert.Equal(t, "0000000000000000", st["CapAmb"])
	self, err := os.ReadFile("/proc/self/status")
	require.NoError(t, err)
	assert.Equal(t, statusOf(string(self))["CapBnd"], st["CapBnd"], "the bounding set is left alone")
	// Read through the container's /proc (its mount namespace), which shows only the processes of
	// its PID namespace: /proc/self resolves, so cat is one of them.
	assert.Len(t, strings.Fields(st["NSpid"]), 1, "cat runs in the container's PID namespace: %s", st["NSpid"])

	env, errs, code := runPreloaded(t, b, j, []string{"1000:2000"}, "/usr/bin/env")
	require.Equal(t, 0, code, "stderr: %s", errs)
	assert.NotContains(t, env, "STASIS_NSJOIN", "nsjoin.so's variables are removed before main")
}

// Without STASIS_NSJOIN_CRED the program stays root with the caller's capabilities; a malformed
// credential (empty included) stops it before main, loudly.
func TestNsJoinCredAbsentOrBad(t *testing.T) {
	b := testBundle(t)
	j := testContainer(t)
	self, err := os.ReadFile("/proc/self/status")
	require.NoError(t, err)
	out, errs, code := runPreloaded(t, b, j, nil, "/bin/cat", "/proc/self/status")
	require.Equal(t, 0, code, "stderr: %s", errs)
	st, mine := statusOf(out), statusOf(string(self))
	assert.Equal(t, "0 0 0 0", st["Uid"])
	for _, k := range []string{"CapEff", "CapPrm", "CapBnd"} {
		assert.Equal(t, mine[k], st[k], k)
	}
	assert.Len(t, strings.Fields(st["NSpid"]), 1, "in the container's PID namespace: %s", st["NSpid"])

	for _, bad := range []string{"", "1000", "1000:", ":1000", "x:1", "1:2:3", "4294967295:0", "-1:0"} {
		out, errs, code := runPreloaded(t, b, j, []string{bad}, "/bin/cat", "/proc/self/status")
		assert.Equal(t, 126, code, "%q: stdout %s", bad, out)
		assert.Contains(t, errs, "bad STASIS_NSJOIN_CRED", bad)
		assert.Empty(t, out, "%q: the program must not run", bad)
	}
}
