package agent

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// guardUffds counts the userfaultfds process pid holds.
func guardUffds(pid int) int {
	n := 0
	fds, _ := filepath.Glob(fmt.Sprintf("/proc/%d/fd/*", pid))
	for _, fd := range fds {
		if t, err := os.Readlink(fd); err == nil && t == "anon_inode:[userfaultfd]" {
			n++
		}
	}
	return n
}

// A child the app forks during the transfer gets a userfaultfd of its own: the daemon hands it to
// the guard (hold), which holds it like those it started with; told that every page is in, the
// guard exits quietly and kills nothing.
func TestGuardHoldsForkedUserfaultfds(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the guard joins cgroups and userfaultfds need privilege here")
	}
	start := func() *exec.Cmd {
		c := exec.Command("sleep", "60")
		require.NoError(t, c.Start())
		t.Cleanup(func() { _ = c.Process.Kill(); _ = c.Wait() })
		return c
	}
	launcher, root := start(), start()
	g, err := startLazyGuard(launcher.Process.Pid, root.Process.Pid, nil)
	require.NoError(t, err)
	t.Cleanup(g.release)
	assert.Zero(t, guardUffds(g.cmd.Process.Pid))

	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC, 0, 0)
	require.Zero(t, errno, "userfaultfd")
	g.hold(int(fd))
	unix.Close(int(fd))
	waitFor(t, 10*time.Second, "the guard holding the forked child's userfaultfd", func() bool { return guardUffds(g.cmd.Process.Pid) == 1 })

	g.complete()
	select {
	case <-g.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the guard did not exit on complete")
	}
	assert.True(t, g.cmd.ProcessState.Success(), "%s", g.cmd.ProcessState)
	for _, c := range []*exec.Cmd{launcher, root} {
		assert.NoError(t, c.Process.Signal(unix.Signal(0)), "the guard killed nothing")
	}
}
