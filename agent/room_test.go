package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
)

// smallVolume makes the rig's checkpoint volume a tmpfs of size bytes.
func smallVolume(t *testing.T, r *rig, size string) {
	require.NoError(t, os.MkdirAll(r.root, 0o755))
	require.NoError(t, unix.Mount("tmpfs", r.root, "tmpfs", 0, "size="+size))
	t.Cleanup(func() { _ = unix.Unmount(r.root, unix.MNT_DETACH) })
}

// dumpAndThaw checkpoints the app and lets it run on (the pod stays), as repeated evictions
// refused later would.
func dumpAndThaw(t *testing.T, r *rig, uid string) agentapi.CheckpointStatus {
	st := r.checkpoint(uid, agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
	r.agent.Delete(uid)
	return st
}

// A volume with room for two checkpoints and a half: the third dump finds too little free space,
// prunes all but the newest first, and fits; Stasis keeps its checkpoints within the volume.
func TestDumpMakesRoomFirst(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour, KeepOlder: 1})
	smallVolume(t, r, "40m")
	r.startCounter("-touch-mib", "12", "-random", "-churn")
	for i, uid := range []string{"u1", "u2", "u3", "u4"} {
		st := dumpAndThaw(t, r, uid)
		require.Equal(t, agentapi.PhaseSucceeded, st.Phase, "dump %d: %s", i+1, st.Message)
	}
	assert.Contains(t, r.logs.String(), "pruned all but the newest checkpoint before the dump")
	entries, err := checkpoint.List(r.dir("app"))
	require.NoError(t, err)
	assert.Len(t, entries, 2, "kept: the newest two")
}

// A volume too small for two checkpoints: the second dump fails with ENOSPC, says the volume is
// full, leaves the first checkpoint intact and restorable, and the app runs on.
func TestFullVolumeFailsCleanly(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour, KeepOlder: 1})
	smallVolume(t, r, "20m")
	c, out := r.startCounter("-touch-mib", "12", "-random", "-churn")
	first := dumpAndThaw(t, r, "u1")
	require.Equal(t, agentapi.PhaseSucceeded, first.Phase, first.Message)
	id := first.Containers[0].CheckpointID

	second := r.checkpoint("u2", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
	require.Equal(t, agentapi.PhaseFailed, second.Phase)
	assert.Contains(t, second.Message, "is full")
	// Said once, and without CRIU's log: CRIU only saw its pipes close.
	assert.Equal(t, 1, strings.Count(second.Message, "no space left on device"), second.Message)
	assert.NotContains(t, second.Message, "CRIU log")
	n := len(readCounts(t, out))
	waitCount(t, c, out, n+3) // thawed at once: it counts on

	entries, err := checkpoint.List(r.dir("app"))
	require.NoError(t, err)
	require.Len(t, entries, 1)
	assert.Equal(t, id, entries[0].ID, "the newest complete checkpoint is still there")
	d, err := os.Open(entries[0].Path)
	require.NoError(t, err)
	defer d.Close()
	m, err := checkpoint.CheckAt(d, id, testKey)
	require.NoError(t, err)
	require.NoError(t, checkpoint.VerifyImagesAt(d, m), "and intact")
	left, _ := filepath.Glob(filepath.Join(r.dir("app"), ".*"))
	assert.Equal(t, []string{filepath.Join(r.dir("app"), ".chunks")}, left, "no partial checkpoint is left behind, only the chunk store")
	tmp, _ := filepath.Glob(filepath.Join(r.dir("app"), ".chunks", ".*"))
	assert.Empty(t, tmp, "and no partial pack file in the chunk store")
}
