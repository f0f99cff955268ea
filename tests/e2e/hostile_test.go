//go:build e2e

package e2e

// Scenario 11: the hostile-tenant suite beyond scenario 10, on real nodes. Each case is a tenant
// that tries to get something out of Stasis, and each asserts on the app's own output, on the
// host's files and on the other tenant's data.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/tests/cluster"
	"github.com/stasis-k8s/stasis/tests/e2e/harness"
	"github.com/stasis-k8s/stasis/webhook/catalog"
	"github.com/stasis-k8s/stasis/wiring"
)

const (
	storageVolumeLabel = "memverge.ai/checkpoint-storage-volume"
	ckptVolume         = "ckpt"
)

// Scenario 11a: tenant B obtains a real checkpoint of tenant A (here copied by the admin harness
// from A's volume, as a leaked backup or a shared disk would give it), puts it under its own
// identity on its own volume and records it on its own PVC, which a tenant may annotate. The
// webhook takes the record and asks for a restore; the agent refuses it (taken in another
// namespace), B's app starts from 0, an Event says why, and A's checkpoint is untouched: A, resumed,
// continues from it.
func TestScenario11ForeignNamespaceCheckpoint(t *testing.T) {
	ctx := context.Background()
	nsA := newNamespace(t, "s11a")
	_, err := env.CreateCounterJob(ctx, nsA, harness.CounterSpec{Name: "counter", Checkpoint: true, Args: []string{"--to=600"}})
	require.NoError(t, err)
	a, err := env.WaitJobPod(ctx, nsA, "counter", 3*time.Minute)
	require.NoError(t, err)
	followA := env.Follow(ctx, nsA, a.Name)
	_, err = env.WaitCount(ctx, nsA, a.Name, 8, 2*time.Minute)
	require.NoError(t, err)
	_, err = env.SetSuspend(ctx, nsA, "counter", true)
	require.NoError(t, err)
	require.NoError(t, env.WaitNoActivePods(ctx, nsA, "counter", 2*time.Minute))
	beforeA, err := followA.Wait(time.Minute)
	require.NoError(t, err)

	idA := a.Annotations[wiring.AnnotationIdentity]
	rec := podRecord(t, a, idA)
	dirA, err := env.CheckpointDir(ctx, a)
	require.NoError(t, err)
	ckptA := filepath.Join(dirA, wiring.IdentityDir(idA), harness.CounterContainer, rec.ID)
	require.FileExists(t, filepath.Join(ckptA, checkpoint.ManifestName), "A's checkpoint")
	sumsA := treeState(t, dirA)

	nsB := newNamespace(t, "s11b")
	pvcB, dirB := staticVolume(t, nsB)
	idB := "pod/" + nsB + "/counter"
	runCmd(t, "cp", "-a", ckptA, mkParent(t, filepath.Join(dirB, wiring.IdentityDir(idB), harness.CounterContainer, rec.ID)))
	forged := *rec
	forged.Identity, forged.PodUID = idB, ""
	annotatePVC(t, nsB, pvcB, catalog.RecordKey(idB), forged)

	// Whether the webhook's cache already shows the forged record (then the pod is created to
	// restore it) or not (then the agent finds the copy on B's volume itself, as it finds a
	// checkpoint taken on termination), the agent is what must refuse.
	b := plainCounter(t, nsB, harness.CounterSpec{Name: "counter", Args: []string{"--to=600"}}, pvcB)
	t.Logf("B created with a restore annotation: %v", b.Annotations[wiring.AnnotationRestore] != "")
	outB, err := env.WaitCount(ctx, nsB, b.Name, 3, time.Minute)
	require.NoError(t, err)
	assert.Equal(t, 1, outB.FreshStarts, "B must start afresh")
	assert.Equal(t, 0, outB.First(), "a cold start counts from 0")
	why := waitEvent(t, nsB, b.Name, "cold start")
	t.Logf("B's Event: %s", why)
	assert.Contains(t, why, fmt.Sprintf("was taken in namespace %q, not %q", nsA, nsB))

	assert.Equal(t, sumsA, treeState(t, dirA), "A's checkpoint volume must be untouched")
	resumeContinues(t, nsA, "counter", beforeA, a)
}

// Scenario 11b: the same namespace and identity, another image: a plain pod is evicted
// (checkpointed), then re-created with the same name from another image of the counter (same
// program, another digest). The record matches, the webhook asks for a restore; the agent refuses
// it (taken of another image), the app starts from 0 and an Event names both images.
func TestScenario11OtherImageCheckpoint(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t, "s11i")
	pvc, dir := staticVolume(t, ns)
	spec := harness.CounterSpec{Name: "counter", Args: []string{"--to=600"}}
	first := plainCounter(t, ns, spec, pvc)
	follow := env.Follow(ctx, ns, first.Name)
	_, err := env.WaitCount(ctx, ns, first.Name, 8, 2*time.Minute)
	require.NoError(t, err)
	_, err = env.Evict(ctx, ns, first.Name)
	require.NoError(t, err)
	before, err := follow.Wait(time.Minute)
	require.NoError(t, err)
	require.NotEmpty(t, before.Lines)

	m := readManifest(t, filepath.Join(dir, wiring.IdentityDir("pod/"+ns+"/counter"), harness.CounterContainer))
	require.NotEmpty(t, m.ImageRef, "the manifest records the image the runtime ran")
	t.Logf("checkpoint %s of image %s (%s)", m.ID, m.Image, m.ImageRef)

	spec.Image = cluster.CounterImageV2
	second := plainCounter(t, ns, spec, pvc)
	require.NotEmpty(t, second.Annotations[wiring.AnnotationRestore], "same identity: the webhook asks for the restore")
	out, err := env.WaitCount(ctx, ns, second.Name, 3, time.Minute)
	require.NoError(t, err)
	assert.Equal(t, 1, out.FreshStarts, "another image must start afresh")
	assert.Equal(t, 0, out.First())
	why := waitEvent(t, ns, second.Name, "cold start")
	t.Logf("Event: %s", why)
	assert.Contains(t, why, "was taken of image "+m.ImageRef)
}

// Scenario 11c: a sidecar of the attacker's pod, sharing its checkpoint volume and the emptyDir
// that holds its checkpoint-files path, loops swapping the checkpoint directory (and every entry in
// it) and that path for symlinks to the host's /etc, /proc/1/root and the node's /var/lib/kubelet,
// to marker directories placed there, and to another tenant's checkpoint volume, while the agent
// dumps the pod and while it restores it. Nothing on the host and nothing of the other tenant may
// change, no host byte may land in the attacker's checkpoint, and the eviction either succeeds with
// a checkpoint inside the attacker's volume or is refused with the app still running.
func TestScenario11SymlinkSwapDuringDump(t *testing.T) {
	ctx := context.Background()
	nsV := newNamespace(t, "s11v")
	pvcV, dirV := staticVolume(t, nsV)
	victim := plainCounter(t, nsV, harness.CounterSpec{Name: "victim", Args: []string{"--to=600"}}, pvcV)
	_, err := env.WaitCount(ctx, nsV, victim.Name, 5, 2*time.Minute)
	require.NoError(t, err)
	_, err = env.Evict(ctx, nsV, victim.Name)
	require.NoError(t, err)

	token := fmt.Sprintf("stasis-e2e-host-marker-%d", time.Now().UnixNano())
	markers := []string{"/etc/" + token}
	for _, n := range env.Local.Nodes {
		markers = append(markers, filepath.Join(env.Dir, "nodes", n.Name, "root", "var/lib/kubelet", token))
	}
	for _, m := range markers {
		plantMarker(t, m, token)
	}
	watched := append([]string{dirV}, markers...)
	before := map[string]map[string]string{}
	for _, d := range watched {
		before[d] = treeState(t, d)
	}
	listed := []string{"/", "/etc"}
	for _, n := range env.Local.Nodes {
		listed = append(listed, filepath.Join(env.Dir, "nodes", n.Name, "root", "var/lib/kubelet"))
	}
	names := map[string][]string{}
	for _, d := range listed {
		names[d] = dirNames(t, d)
	}

	ns := newNamespace(t, "s11s")
	pvc, dir := staticVolume(t, ns)
	idDir := wiring.IdentityDir("pod/" + ns + "/counter")
	targets := []string{"/etc", "/etc/" + token, "/proc/1/root", "/proc/1/root/etc/" + token, "/var/lib/kubelet",
		"/var/lib/kubelet/" + token, "/proc/1/root/var/lib/kubelet", dirV, "/proc/1/root" + dirV,
		"../../../../../../../../etc/" + token, "/stasis/checkpoints/" + wiring.IdentityDir("pod/"+nsV+"/victim")}
	shared := corev1.VolumeMount{Name: "shared", MountPath: "/shared"}
	spec := harness.CounterSpec{Name: "counter", Args: []string{"--to=600", "--file=/shared/state"},
		Annotations:  map[string]string{"memverge.ai/checkpoint-files": "/shared/state", "memverge.ai/checkpoint-containers": harness.CounterContainer},
		VolumeMounts: []corev1.VolumeMount{shared},
		Sidecars: []corev1.Container{{Name: "swapper", Image: env.CounterImage, ImagePullPolicy: corev1.PullIfNotPresent,
			Command:      []string{"/counter", "--swap=" + strings.Join(append([]string{"/vol/" + idDir + "/" + harness.CounterContainer, "/shared/state"}, targets...), ",")},
			VolumeMounts: []corev1.VolumeMount{shared, {Name: ckptVolume, MountPath: "/vol"}}}},
	}
	attacker := plainCounter(t, ns, spec, pvc, corev1.Volume{Name: "shared", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
	follow := env.Follow(ctx, ns, attacker.Name)
	_, err = env.WaitCount(ctx, ns, attacker.Name, 8, 2*time.Minute)
	require.NoError(t, err)
	time.Sleep(2 * time.Second) // the sidecar is swapping (it starts 3 s after the pod)

	swapsBefore := swapCount(t, ns, attacker.Name)
	took, evictErr := env.Evict(ctx, ns, attacker.Name)
	if evictErr == nil {
		out, err := follow.Wait(time.Minute)
		require.NoError(t, err)
		t.Logf("the sidecar had swapped %d times before the eviction", swapsBefore)
		complete := completeCheckpoints(t, dir)
		t.Logf("eviction allowed after %s: the app counted to %d; complete checkpoints in the attacker's volume: %q",
			took.Round(10*time.Millisecond), out.Last(), complete)
		require.NotEmpty(t, complete, "an allowed eviction means a complete checkpoint, in the pod's own volume")
		// The re-created pod asks for the restore while its own sidecar swaps from the start (the
		// app may then fail: a cold start writes its file through whatever symlink is there).
		spec.Sidecars[0].Command = append(spec.Sidecars[0].Command, "--swap-delay=0s")
		spec.Checkpoint, spec.Labels = true, map[string]string{storageVolumeLabel: ckptVolume}
		_, err = env.CreateCounterPod(ctx, ns, spec, corev1.Volume{Name: ckptVolume, VolumeSource: corev1.VolumeSource{
			PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: pvc}}},
			corev1.Volume{Name: "shared", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
		require.NoError(t, err)
		t.Logf("restore under swaps: %s", waitEvent(t, ns, spec.Name, "container counter: "))
		time.Sleep(3 * time.Second)
	} else {
		t.Logf("eviction refused after %s: %v; the sidecar swapped %d times before it and %d in all",
			took.Round(10*time.Millisecond), evictErr, swapsBefore, swapCount(t, ns, attacker.Name))
		assert.NotContains(t, evictErr.Error(), "TooManyRequests", "refused, not left hanging")
		now, err := env.Logs(ctx, ns, attacker.Name)
		require.NoError(t, err)
		later, err := env.WaitCount(ctx, ns, attacker.Name, now.Last()+3, time.Minute)
		require.NoError(t, err, "the refused pod's app must run on")
		assert.Equal(t, 1, later.FreshStarts)
	}

	for _, d := range watched {
		assert.Equal(t, before[d], treeState(t, d), "%s must be unchanged", d)
	}
	for _, d := range listed {
		assert.Equal(t, names[d], dirNames(t, d), "nothing created or removed in %s", d)
	}
	hits := scanTree(t, dir, [][]byte{[]byte(token)})
	assert.Empty(t, hits.found, "no host marker may be copied into the attacker's volume")
}

// Scenario 11d: a wired pod looks for the agents' manifest key on every route it has: every URL
// path of the agent's channel (GET and POST), the agents' health port and mTLS port at their pod
// IPs, the API server with its ServiceAccount token, /proc of its pod, and its mounted volumes,
// before and after a real checkpoint and restore. The key's bytes (read by the harness from an
// agent on the node, in every form: raw, hex, base64; and the private key it is derived from) are
// nowhere in the pod's filesystem view (its writable layer holding what the routes answered, the
// tools volume, the checkpoint volume with the checkpoint), nor in the checkpoint volume on the
// host.
func TestScenario11ReadAgentKey(t *testing.T) {
	ctx := context.Background()
	needles := agentKeyNeedles(t)
	agents, err := env.Client.CoreV1().Pods(harness.StasisNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=stasis-agent"})
	require.NoError(t, err)
	var ips []string
	for _, p := range agents.Items {
		ips = append(ips, p.Status.PodIP)
	}
	ns := newNamespace(t, "s11k")
	_, err = env.CreateCounterJob(ctx, ns, harness.CounterSpec{Name: "hunter", Checkpoint: true,
		Args: []string{"--to=600", "--hunt=" + strings.Join(ips, ",")}})
	require.NoError(t, err)
	p, err := env.WaitJobPod(ctx, ns, "hunter", 3*time.Minute)
	require.NoError(t, err)
	follow := env.Follow(ctx, ns, p.Name)
	out, err := env.WaitCount(ctx, ns, p.Name, 3, 2*time.Minute)
	require.NoError(t, err)
	t.Logf("the hunt:\n%s", huntLines(out.Text))
	require.Contains(t, out.Text, "hunt: done")
	assert.Regexp(t, `hunt: api /api/v1/namespaces/stasis-system/secrets/stasis-agent-tls: 403`, out.Text)
	assert.Regexp(t, `hunt: channel GET /v1/key: 40[34] `, out.Text)
	assert.Regexp(t, `hunt: agent https://[0-9.]+:9443/v1/checkpoints: 401 .*client certificate`, out.Text, "the agent API wants a client certificate")
	scanPod(t, "--hunt=", needles, true)

	_, err = env.SetSuspend(ctx, ns, "hunter", true)
	require.NoError(t, err)
	require.NoError(t, env.WaitNoActivePods(ctx, ns, "hunter", 2*time.Minute))
	before, err := follow.Wait(time.Minute)
	require.NoError(t, err)
	dir, err := env.CheckpointDir(ctx, p)
	require.NoError(t, err)
	require.NotEmpty(t, completeCheckpoints(t, dir))
	onVolume := scanTree(t, dir, needles)
	t.Logf("checkpoint volume: %d files, %d bytes scanned", onVolume.files, onVolume.bytes)
	assert.Empty(t, onVolume.found, "the agents' key in the checkpoint volume")

	_, err = env.SetSuspend(ctx, ns, "hunter", false)
	require.NoError(t, err)
	resumed, err := env.WaitJobPod(ctx, ns, "hunter", 3*time.Minute, p)
	require.NoError(t, err)
	after, err := env.WaitCount(ctx, ns, resumed.Name, before.Last()+2, time.Minute)
	require.NoError(t, err)
	continues(t, before, after)
	scanPod(t, "--hunt=", needles, false) // the loot stayed in the old container's writable layer
}

// swapCount waits until the swapper sidecar of pod reports swaps, and returns the last count.
func swapCount(t *testing.T, ns, pod string) int {
	t.Helper()
	n := 0
	require.Eventually(t, func() bool {
		raw, err := env.Client.CoreV1().Pods(ns).GetLogs(pod, &corev1.PodLogOptions{Container: "swapper"}).DoRaw(context.Background())
		if err != nil {
			return false
		}
		for _, l := range strings.Split(string(raw), "\n") {
			fmt.Sscanf(l, "swap: %d swaps", &n)
		}
		return n > 0
	}, 30*time.Second, 500*time.Millisecond, "the sidecar reports no swap")
	return n
}

// plainCounter creates a plain checkpointed counter pod whose checkpoints go to the PVC (volume
// ckptVolume, named in the storage label), with more volumes, and waits until it is Ready.
func plainCounter(t *testing.T, ns string, s harness.CounterSpec, pvc string, volumes ...corev1.Volume) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	s.Checkpoint = true
	s.Labels = map[string]string{storageVolumeLabel: ckptVolume}
	vols := append([]corev1.Volume{{Name: ckptVolume, VolumeSource: corev1.VolumeSource{
		PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: pvc}}}}, volumes...)
	_, err := env.CreateCounterPod(ctx, ns, s, vols...)
	require.NoError(t, err)
	p, err := env.WaitPodReady(ctx, ns, s.Name, 3*time.Minute)
	require.NoError(t, err)
	return p
}

// staticVolume creates a hostPath PV in the e2e directory and a PVC bound to it, and returns the
// PVC's name and the PV's host path.
func staticVolume(t *testing.T, ns string) (string, string) {
	t.Helper()
	ctx := context.Background()
	const class, claim = "stasis-static", "checkpoints"
	dir := filepath.Join(env.Dir, "static-pv", ns)
	require.NoError(t, os.MkdirAll(dir, 0o700))
	size := resource.MustParse("2Gi")
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: "static-" + ns},
		Spec: corev1.PersistentVolumeSpec{
			StorageClassName: class, Capacity: corev1.ResourceList{corev1.ResourceStorage: size},
			AccessModes:                   []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRetain,
			PersistentVolumeSource:        corev1.PersistentVolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: dir}},
			ClaimRef:                      &corev1.ObjectReference{Namespace: ns, Name: claim},
		},
	}
	_, err := env.Client.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = env.Client.CoreV1().PersistentVolumes().Delete(context.Background(), pv.Name, metav1.DeleteOptions{})
	})
	cls := class
	_, err = env.Client.CoreV1().PersistentVolumeClaims(ns).Create(ctx, &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: claim},
		Spec: corev1.PersistentVolumeClaimSpec{StorageClassName: &cls, VolumeName: pv.Name,
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources:   corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: size}}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	return claim, dir
}

// podRecord is the catalog record of identity on the checkpoint PVC of pod.
func podRecord(t *testing.T, pod *corev1.Pod, identity string) *catalog.Record {
	t.Helper()
	for _, v := range pod.Spec.Volumes {
		if v.Name != wiring.CheckpointVolume || v.PersistentVolumeClaim == nil {
			continue
		}
		pvc, err := env.Client.CoreV1().PersistentVolumeClaims(pod.Namespace).Get(context.Background(), v.PersistentVolumeClaim.ClaimName, metav1.GetOptions{})
		require.NoError(t, err)
		rec, ok := catalog.RecordOf(pvc, identity)
		require.True(t, ok && rec != nil, "no record of %s on PVC %s", identity, pvc.Name)
		return rec
	}
	t.Fatalf("pod %s has no %s volume", pod.Name, wiring.CheckpointVolume)
	return nil
}

// annotatePVC sets one annotation of a PVC to v (JSON), as its namespace's tenant may.
func annotatePVC(t *testing.T, ns, pvc, key string, v any) {
	t.Helper()
	raw, err := json.Marshal(v)
	require.NoError(t, err)
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{key: string(raw)}}})
	require.NoError(t, err)
	_, err = env.Client.CoreV1().PersistentVolumeClaims(ns).Patch(context.Background(), pvc, types.MergePatchType, patch, metav1.PatchOptions{})
	require.NoError(t, err)
}

// readManifest reads the manifest of the one checkpoint in a container's checkpoint directory.
func readManifest(t *testing.T, containerDir string) *checkpoint.Manifest {
	t.Helper()
	found, err := filepath.Glob(filepath.Join(containerDir, "*", checkpoint.MarkerName))
	require.NoError(t, err)
	require.Len(t, found, 1, "one complete checkpoint in %s", containerDir)
	raw, err := os.ReadFile(filepath.Join(filepath.Dir(found[0]), checkpoint.ManifestName))
	require.NoError(t, err)
	var m checkpoint.Manifest
	require.NoError(t, json.Unmarshal(raw, &m))
	return &m
}

// completeCheckpoints lists the directories below dir that hold a completion marker and a
// manifest.
func completeCheckpoints(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() || d.Name() != checkpoint.MarkerName {
			return nil
		}
		if _, err := os.Stat(filepath.Join(filepath.Dir(p), checkpoint.ManifestName)); err == nil {
			rel, _ := filepath.Rel(dir, filepath.Dir(p))
			out = append(out, rel)
		}
		return nil
	})
	require.NoError(t, err)
	return out
}

func mkParent(t *testing.T, p string) string {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o700))
	return p
}

func runCmd(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %q: %s", name, args, out)
}

func huntLines(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "hunt: ") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}
