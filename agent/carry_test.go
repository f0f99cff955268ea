package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
)

func TestCarryReason(t *testing.T) {
	vols := []Mount{
		{ContainerPath: "/cache", HostPath: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/cache"},
		{ContainerPath: "/data", HostPath: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pvc-1/mount"},
		{ContainerPath: "/ro", HostPath: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/ro", ReadOnly: true},
		{ContainerPath: "/etc/config", HostPath: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~configmap/config"},
	}
	tests := []struct {
		name    string
		mp      mountPoint
		changed bool
		want    string
	}{
		{"a file the app wrote in its root", mountPoint{point: "/", fstype: "overlay"}, true, "open in the writable layer"},
		{"an image file", mountPoint{point: "/", fstype: "overlay"}, false, ""},
		{"/dev/shm", mountPoint{point: "/dev/shm", fstype: "tmpfs"}, false, "open on tmpfs /dev/shm"},
		{"an emptyDir", mountPoint{point: "/cache", fstype: "ext4"}, false, "open in emptyDir volume /cache"},
		{"an emptyDir of medium Memory", mountPoint{point: "/cache", fstype: "tmpfs"}, true, "open in emptyDir volume /cache"},
		{"a persistent volume follows the pod", mountPoint{point: "/data", fstype: "ext4"}, true, ""},
		{"a read-only emptyDir cannot be written back", mountPoint{point: "/ro", fstype: "ext4"}, true, ""},
		{"a configMap (tmpfs) is recreated from the API", mountPoint{point: "/etc/config", fstype: "tmpfs"}, true, ""},
		{"an unknown mount is left alone", mountPoint{point: "/mnt/x", fstype: "nfs"}, true, ""},
		{"a file on no known mount", mountPoint{}, true, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, carryReason("open", tt.mp, vols, tt.changed))
		})
	}
}

func TestUnescapeMount(t *testing.T) {
	assert.Equal(t, "/a b\tc", unescapeMount(`/a\040b\011c`))
	assert.Equal(t, `/plain`, unescapeMount(`/plain`))
}

// withShm is a setpriv prefix that first gives the container its own /dev/shm, as the runtime
// does for every pod: the tmpfs (and what the app keeps in it) goes with the container.
func withShm(setpriv []string) []string {
	return append([]string{"sh", "-c", `mount -t tmpfs -o mode=1777 shm /dev/shm && exec "$@"`, "sh"}, setpriv...)
}

// What a real app holds in its container's own filesystem travels with the checkpoint without
// being listed: a log file it keeps open in a directory it created (the writable layer), a file
// of /dev/shm it maps shared (POSIX shared memory), and its working directory. The new container
// has none of them; the app continues with all three as they were.
func TestHeldFilesTravel(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	r.serveLocal()
	r.setpriv = withShm(restrictedContainer)
	run := filepath.Join(t.TempDir(), "run") // created by the app after its start
	log := filepath.Join(run, "counter.log")
	args := []string{counterBin, "-chdir", run, "-map", "/dev/shm/seg", log}
	c := startContainerWith(t, "", withShm(restrictedContainer), r.env("app"), append([]string{"--"}, args...)...)
	r.finder["app"] = c.launcherPID()
	waitCount(t, c, log, 10)

	st := r.checkpoint("uid-1", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	id := st.Containers[0].CheckpointID
	dumped := readCounts(t, log)
	m, err := checkpoint.ReadManifest(filepath.Join(r.dir("app"), id))
	require.NoError(t, err)
	reasons := map[string]string{}
	for _, f := range m.Carried {
		reasons[f.Path] = f.Reason
	}
	assert.Equal(t, map[string]string{log: "open in the writable layer", "/dev/shm/seg": "mapped on tmpfs /dev/shm"}, reasons,
		"carried: the files the tree held outside its image and volumes, and nothing else (not the counter binary)")
	var runDir *checkpoint.CarriedDir
	for i := range m.CarriedDirs {
		if m.CarriedDirs[i].Path == run {
			runDir = &m.CarriedDirs[i]
		}
	}
	require.NotNil(t, runDir, "the working directory is recorded: %+v", m.CarriedDirs)
	assert.Equal(t, uint32(0o750), runDir.Mode)

	assert.Equal(t, 143, c.stop())
	require.NoError(t, os.RemoveAll(run), "a new container has a fresh writable layer (and /dev/shm goes with the old one)")

	c2 := r.restoreContainer("app", id, args...)
	got := waitCount(t, c2, log, len(dumped)+5)
	assert.Equal(t, dumped, got[:len(dumped)], "the log is back as it was")
	assert.True(t, isSequence(got), "the restored counter continues from %d, got %v", len(dumped), got)
	fi, err := os.Stat(run)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o750), fi.Mode().Perm(), "the directory is recreated with its mode")
	app, err := appRoot(c2.launcherPID())
	require.NoError(t, err)
	seg, err := os.ReadFile("/proc/" + strconv.Itoa(app) + "/root/dev/shm/seg")
	require.NoError(t, err, "the segment is in the new container's /dev/shm")
	n, err := strconv.Atoi(strings.TrimSpace(strings.TrimRight(string(seg), "\x00")))
	require.NoError(t, err, "%q", seg)
	assert.Greater(t, n, len(dumped), "the restored app still writes into its shared mapping")
	assert.Equal(t, 128+15, c2.stop())
}

// A held file that cannot be carried (here: over the cap) fails the dump with a reason, before
// any eviction relies on it, and the app runs on.
func TestUncarriableFileFailsTheDump(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour, CopyLimits: checkpoint.CopyLimits{Bytes: 64, Entries: 100}})
	log := filepath.Join(t.TempDir(), "counter.log")
	c := startContainer(t, r.env("app"), "--", counterBin, log)
	r.finder["app"] = c.launcherPID()
	waitCount(t, c, log, 40) // more than 64 bytes

	st := r.checkpoint("uid-1", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
	require.Equal(t, agentapi.PhaseFailed, st.Phase)
	assert.Contains(t, st.Message, "the checkpoint would not restore")
	assert.Contains(t, st.Message, log)
	n := len(readCounts(t, log))
	waitCount(t, c, log, n+5) // thawed: it counts on
	entries, _ := checkpoint.List(r.dir("app"))
	assert.Empty(t, entries, "no checkpoint is left that could be restored")
}

// withVolume is a setpriv prefix that first bind-mounts dir onto itself in the container, as the
// kubelet mounts a persistent volume: a mount of its own, which the runtime reports.
func withVolume(dir string, setpriv []string) []string {
	return append([]string{"sh", "-c", `mount --bind "$0" "$0" && exec "$@"`, dir}, setpriv...)
}

// A file in a persistent volume follows the pod and is not carried; another process (a sidecar, a
// log shipper) appends to it after the dump. CRIU would refuse the changed size ("has bad size"):
// the agent hands it the file as it is now, and the restored app appends after the sidecar's line.
func TestVolumeFileChangedAfterDump(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	r.serveLocal()
	vol := t.TempDir()
	r.mounts = []Mount{{ContainerPath: vol, HostPath: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pvc-1/mount"}}
	r.setpriv = withVolume(vol, restrictedContainer)
	log := filepath.Join(vol, "counter.log")
	c := startContainerWith(t, "", withVolume(vol, restrictedContainer), r.env("app"), "--", counterBin, log)
	r.finder["app"] = c.launcherPID()
	waitCount(t, c, log, 10)

	st := r.checkpoint("uid-1", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	id := st.Containers[0].CheckpointID
	m, err := checkpoint.ReadManifest(filepath.Join(r.dir("app"), id))
	require.NoError(t, err)
	assert.Empty(t, m.Carried, "a persistent volume's file is not carried")
	dumped := readCounts(t, log)
	assert.Equal(t, 143, c.stop())

	f, err := os.OpenFile(log, os.O_WRONLY|os.O_APPEND, 0)
	require.NoError(t, err)
	_, err = f.WriteString("sidecar\n")
	require.NoError(t, err)
	require.NoError(t, f.Close())

	c2 := r.restoreContainer("app", id, counterBin, log)
	c2.waitOutput("restored; supervising the restored tree")
	var after []string
	deadline := time.Now().Add(time.Minute)
	for len(after) < len(dumped)+6 && time.Now().Before(deadline) {
		b, err := os.ReadFile(log)
		require.NoError(t, err)
		after = strings.Fields(string(b))
		time.Sleep(20 * time.Millisecond)
	}
	require.Greater(t, len(after), len(dumped)+5, "the restored app appends to the file")
	assert.Equal(t, "sidecar", after[len(dumped)], "the sidecar's line stays where it was written")
	next, err := strconv.Atoi(after[len(dumped)+1])
	require.NoError(t, err)
	assert.Equal(t, len(dumped)+1, next, "the restored counter continues after the sidecar's line")
	assert.Equal(t, 128+15, c2.stop())
}

// A file the app deleted while it keeps it open is not carried (there is no path to put it back
// at): CRIU keeps its contents in the images (a ghost file) and the restored app writes on to it.
func TestDeletedOpenFileTravelsAsGhost(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	r.serveLocal()
	c, out := r.startCounter()
	waitCount(t, c, out, 10)
	require.NoError(t, os.Remove(out))
	st := r.checkpoint("uid-1", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	id := st.Containers[0].CheckpointID
	m, err := checkpoint.ReadManifest(filepath.Join(r.dir("app"), id))
	require.NoError(t, err)
	assert.Empty(t, m.Carried, "nothing to carry: the file has no path")
	last := strings.Fields(c.out.String())
	n, err := strconv.Atoi(last[len(last)-1])
	require.NoError(t, err, "the counter's last line: %q", last[len(last)-1])
	assert.Equal(t, 143, c.stop())

	c2 := r.restoreContainer("app", id, counterBin, out)
	c2.waitOutput("restored; supervising the restored tree")
	c2.waitOutput(fmt.Sprintf("\n%d\n", n+3)) // it counts on from where it was
	_, err = os.Stat(out)
	assert.True(t, os.IsNotExist(err), "the deleted file stays deleted")
	assert.Equal(t, 128+15, c2.stop())
}
