package agent

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
)

// A pod owns its filesystem, and the CRIU the agent runs holds every privilege of the node. Nothing
// a pod plants may run inside that CRIU: not a library named in /etc/ld.so.preload (the dynamic
// loader of any program started in the container's mount namespace reads it), not a plugin in
// /usr/lib/criu (CRIU dlopen()s every file there), not an action-script named in
// /etc/criu/default.conf (CRIU parses it at start and runs the script at each stage). The test
// first proves the plants work against CRIU started the way the agent used to start it (loaded
// inside the container's mount namespace), then dumps through the agent and finds no trace.
func TestPodFilesNeverReachAgentCRIU(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	work := t.TempDir()
	marker := filepath.Join(work, "marker")
	lib, prog := filepath.Join(work, "evil.so"), filepath.Join(work, "evil")
	cc(t, "-shared", "-fPIC", "-DAS_LIBRARY", `-DMARKER="`+marker+`"`, "-o", lib, "testdata/hostile/evil.c")
	cc(t, "-static", `-DMARKER="`+marker+`"`, "-o", prog, "testdata/hostile/evil.c")

	out := filepath.Join(work, "counter.txt")
	c := startContainer(t, r.env("app"), "--", counterBin, out)
	pid := c.launcherPID()
	r.finder["app"] = pid
	waitCount(t, c, out, 3)

	// The pod's own /etc and /usr/lib, in the container's mount namespace only.
	for _, dir := range []string{"/etc", "/usr/lib"} {
		run(t, "nsenter", "-t", strconv.Itoa(pid), "-m", "--", "mount", "-t", "tmpfs", "pod-owned", dir)
	}
	root := fmt.Sprintf("/proc/%d/root", pid)
	plant(t, root+"/etc/ld.so.preload", lib+"\n")
	plant(t, root+"/etc/criu/default.conf", "action-script "+prog+"\n")
	evil, err := os.ReadFile(lib)
	require.NoError(t, err)
	plant(t, root+"/usr/lib/criu/evil.so", string(evil))

	// The plants are live: CRIU loaded inside the container's mount namespace runs the pod's code.
	b := r.agent.cfg.Criu
	old := exec.Command("nsenter", "-t", strconv.Itoa(pid), "-m", "--",
		filepath.Join(b.Dir, bundleLoaderForTest), "--library-path", filepath.Join(b.Dir, "root/usr/lib/x86_64-linux-gnu"),
		filepath.Join(b.Dir, "root/usr/sbin/criu"), "--version")
	o, _ := old.CombinedOutput()
	got, _ := os.ReadFile(marker)
	require.Contains(t, string(got), "preloaded", "the planted /etc/ld.so.preload must be live for this test to mean anything; criu said: %s", o)
	require.NoError(t, os.Remove(marker))

	st := r.checkpoint("uid-hostile", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	got, err = os.ReadFile(marker)
	assert.True(t, os.IsNotExist(err), "the pod's code ran inside the agent's CRIU:\n%s", got)
}

// bundleLoaderForTest is the bundle's dynamic loader (criurun's layout).
const bundleLoaderForTest = "root/usr/lib64/ld-linux-x86-64.so.2"

func cc(t *testing.T, args ...string) {
	t.Helper()
	run(t, "cc", args...)
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %v: %s", name, args, out)
}

func plant(t *testing.T, path, content string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	require.NoError(t, os.WriteFile(path, []byte(content), 0o755))
}

// The agent restores as root what the images say. A checkpoint of a privileged container restored
// into a container that may hold no capability (its pod changed, or the images were crafted): the
// restored tree, still stopped, holds capabilities outside the new container's bounding set, so
// it is killed and the app starts afresh: a restored app never holds more than its container.
func TestRestoreNeverExceedsItsContainer(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	r.serveLocal()
	out := filepath.Join(t.TempDir(), "counter.txt")
	c := startContainerWith(t, "", nil, r.env("app"), "--", counterBin, out)
	r.finder["app"] = c.launcherPID()
	waitCount(t, c, out, 3)
	st := r.checkpoint("uid-privileged", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app"), Files: []string{out}})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	assert.Equal(t, 143, c.stop())
	require.NoError(t, os.Remove(out))

	c2 := r.restoreContainer("app", st.Containers[0].CheckpointID, counterBin, out)
	c2.waitOutput("COLD START")
	assert.Contains(t, c2.out.String(), "beyond its container's bounding set")
	assert.Equal(t, 1.0, counterValue(t, r.agent.cfg.Metrics.RestoreResults.WithLabelValues("cold-start")))
	c2.stop()
}
