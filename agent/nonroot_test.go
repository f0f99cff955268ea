package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/criurun"
	"github.com/stasis-k8s/stasis/launcher"
)

// The decision of who CRIU dumps as: the app's user only where root cannot read another user's
// rlimits (no CAP_SYS_RESOURCE, as on this VM); root everywhere else.
func TestDumpCredFor(t *testing.T) {
	const all, allButSysResource = ^uint64(0), ^uint64(0) &^ capSysResource
	tests := []struct {
		name     string
		uid, gid uint32
		eff      uint64
		want     *criurun.Cred
	}{
		{"root app, full agent", 0, 0, all, nil},
		{"root app, no CAP_SYS_RESOURCE", 0, 0, allButSysResource, nil},
		{"non-root app, full agent", 1000, 1000, all, nil},
		{"non-root app, no CAP_SYS_RESOURCE", 1000, 2000, allButSysResource, &criurun.Cred{UID: 1000, GID: 2000}},
		{"non-root app, only CAP_SYS_RESOURCE", 1000, 1000, capSysResource, nil},
		{"root group, non-root user", 1000, 0, 0, &criurun.Cred{UID: 1000, GID: 0}},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, dumpCredFor(tt.uid, tt.gid, tt.eff), tt.name)
	}
}

func TestRealIDsAndCapEff(t *testing.T) {
	uid, gid, err := realIDs(os.Getpid())
	require.NoError(t, err)
	assert.Equal(t, uint32(os.Getuid()), uid)
	assert.Equal(t, uint32(os.Getgid()), gid)
	eff, err := agentCapEff()
	require.NoError(t, err)
	assert.Equal(t, credentials(t, os.Getpid())["CapEff"], fmt.Sprintf("%016x", eff))
	_, _, err = realIDs(1 << 30)
	assert.Error(t, err, "no such process")
}

// openToAll lets every user traverse dir and its parents up to the system's temp directory (the
// test's temporary directories are 0700; the app of a non-root container must reach its files).
func openToAll(t *testing.T, dir string, mode os.FileMode) {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o700))
	require.NoError(t, os.Chmod(dir, mode))
	for d := filepath.Dir(dir); strings.HasPrefix(d, os.TempDir()+"/"); d = filepath.Dir(d) {
		require.NoError(t, os.Chmod(d, 0o755))
	}
}

// A non-root app (uid and gid 1000, no capability, no_new_privs) is dumped by the agent and
// restored by it into a new non-root container: the counter continues, with the original's
// credentials. Where the agent lacks CAP_SYS_RESOURCE (this VM), root CRIU cannot read the app's
// rlimits, and the dump runs as the app's user; elsewhere it runs as root.
func TestNonRootAppDumpRestore(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	r.setpriv = nonRootContainer
	r.serveLocal()
	openToAll(t, filepath.Dir(r.socket), 0o755)
	openToAll(t, r.root, 0o755)
	work := t.TempDir()
	openToAll(t, work, 0o777)
	out := filepath.Join(work, "counter.txt")
	c := startContainerWith(t, "", nonRootContainer, r.env("app"), "--", counterBin, out)
	r.finder["app"] = c.launcherPID()
	waitCount(t, c, out, 5)
	app, err := appRoot(r.finder["app"])
	require.NoError(t, err)
	creds := credentials(t, app)
	require.Equal(t, "1000 1000 1000 1000", creds["Uid"], "the app runs as uid 1000: %v", creds)
	require.Equal(t, "1000 1000 1000 1000", creds["Gid"])
	require.Equal(t, "0000000000000000", creds["CapEff"])

	st := r.checkpoint("uid-nonroot", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	id := st.Containers[0].CheckpointID
	eff, err := agentCapEff()
	require.NoError(t, err)
	if eff&capSysResource == 0 {
		assert.Contains(t, r.logs.String(), "dumping as the app's user", "no CAP_SYS_RESOURCE here: the dump ran as uid 1000")
		assert.Contains(t, r.logs.String(), `"criu-uid":1000`)
	} else {
		assert.NotContains(t, r.logs.String(), "dumping as the app's user", "with CAP_SYS_RESOURCE the dump runs as root")
	}
	assert.True(t, launcher.Stopped(app), "the app must stay stopped after its dump")
	dumped := readCounts(t, out)
	require.True(t, isSequence(dumped), "counter before dump: %v", dumped)
	assert.Equal(t, 143, c.stop())
	assert.Equal(t, dumped, readCounts(t, out), "the frozen app must not run on before it is killed")

	c2 := r.restoreContainer("app", id, counterBin, out)
	got := waitCount(t, c2, out, len(dumped)+5)
	assert.True(t, isSequence(got), "the restored counter continues from %d, got %v", len(dumped), got)
	assert.Contains(t, c2.out.String(), "restored; supervising the restored tree")
	restored, err := appRoot(c2.launcherPID())
	require.NoError(t, err)
	assert.Equal(t, creds, credentials(t, restored), "the restored app has the original's credentials, capabilities, no_new_privs and seccomp")
	assert.Equal(t, 128+15, c2.stop())
}
