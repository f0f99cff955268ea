package harness

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/stasis-k8s/stasis/checkpoint"
)

// Images of the application matrix (hack/testimages -apps: a root filesystem from Debian packages).
const (
	AppsImage   = "stasis.local/apps:bookworm"
	LoggerImage = "stasis.local/logger:bookworm"
)

// BuildAppImages runs `hack/testimages -apps` (cached by the hash of its inputs) and returns the
// tarball holding both application images.
func BuildAppImages(root string) (string, error) {
	cmd := exec.Command("go", "run", "./hack/testimages", "-apps")
	cmd.Dir = root
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("hack/testimages -apps: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}

// AppKind is how the user runs an app.
type AppKind int

const (
	// AppJob: a Job of one pod (the Job controller makes the replacement).
	AppJob AppKind = iota
	// AppPod: a plain pod applied from a manifest; after the drain the user applies it again.
	AppPod
)

// App is one entry of the application matrix: the workload as a user writes it and how to read
// the app's own state. The harness adds nothing Stasis-specific beyond what the entry holds.
type App struct {
	Name    string // Job name (AppJob); a label app=<Name> selects its pods
	Version string // what runs, for the matrix
	Kind    AppKind
	// Template is the Job's pod template (AppJob), with memverge.ai/checkpoint-mode set by the entry.
	Template corev1.PodTemplateSpec
	// Manifest is the YAML applied with kubectl (AppPod); PodName its pod and Selector a label
	// selector of that pod for the drain.
	Manifest, PodName, Selector string
	// Claims are PVCs (name → size) the test creates first, as the user would (data directories).
	Claims map[string]string
	// Ticks: counter-format apps (lines "<n> key=value…") run until they printed at least Ticks
	// before the drain; 0 for apps without such output.
	Ticks int
	// Prepare runs against the first pod once it is up: it writes the state that must survive the
	// drain and returns what it read. Read reads the state from the replacement. Either may be nil.
	Prepare, Read func(ctx context.Context, e *Env, pod *corev1.Pod) (map[string]string, error)
	// During, when set, is a command run with kubectl exec in the first pod from just before the
	// drain until the pod is gone (a client holding a connection open across the checkpoint); its
	// output is StateBefore["during"].
	During []string
}

// AppResult is what one drain of an app showed.
type AppResult struct {
	OldPod, NewPod          *corev1.Pod
	Before, After           CounterOutput // the app's own output, old pod and replacement
	StateBefore, StateAfter map[string]string
	DrainTook               time.Duration
	DrainOutput             string
	NewPodReadyAfter        time.Duration // from the end of the drain
	Manifest                *checkpoint.Manifest
	// RestoreEvent is the replacement's Restored or RestoreFailed Event ("Reason: message").
	RestoreEvent string
	// Warnings are the namespace's Warning Events ("object Reason: message").
	Warnings []string
}

// Restored reports whether the replacement was restored (not cold-started).
func (r *AppResult) Restored() bool { return strings.HasPrefix(r.RestoreEvent, "Restored:") }

var restoredRe = regexp.MustCompile(`restored checkpoint \S+ \((\d+) bytes of images\) in ([0-9.]+)s`)

// RestoreSeconds is the agent's restore time from the Restored Event (-1 when none).
func (r *AppResult) RestoreSeconds() float64 {
	m := restoredRe.FindStringSubmatch(r.RestoreEvent)
	if m == nil {
		return -1
	}
	var s float64
	fmt.Sscanf(m[2], "%g", &s)
	return s
}

// RunApp creates the app, waits until it is up and Prepare succeeded, drains its node, brings up
// the replacement (the Job controller, or the user applying the manifest again), reads the state
// again and collects the checkpoint's figures and the Events. The node is uncordoned before it
// returns. Errors after the drain still return what was seen so far.
func (e *Env) RunApp(ctx context.Context, ns string, a App) (*AppResult, error) {
	r := &AppResult{}
	if err := e.createClaims(ctx, ns, a.Claims); err != nil {
		return r, err
	}
	old, err := e.startApp(ctx, ns, a)
	if err != nil {
		return r, err
	}
	r.OldPod = old
	defer func() { _ = e.Uncordon(context.Background(), old.Spec.NodeName) }()
	follow := e.Follow(ctx, ns, old.Name)
	if a.Ticks > 0 {
		if _, err := e.WaitCount(ctx, ns, old.Name, a.Ticks, 3*time.Minute); err != nil {
			return r, err
		}
	}
	if a.Prepare != nil {
		if r.StateBefore, err = a.Prepare(ctx, e, old); err != nil {
			return r, fmt.Errorf("prepare %s: %w", a.Name, err)
		}
	}
	var during *exec.Cmd
	var duringOut strings.Builder
	if len(a.During) > 0 {
		during = e.execCmd(ctx, old, a.During...)
		during.Stdout, during.Stderr = &duringOut, &duringOut
		if err := during.Start(); err != nil {
			return r, fmt.Errorf("start %v: %w", a.During, err)
		}
		time.Sleep(2 * time.Second) // connected and working before the drain
	}
	e.logf("app %s up on %s (state %v); draining the node", a.Name, old.Spec.NodeName, r.StateBefore)
	t0 := time.Now()
	r.DrainOutput, err = e.Run(ctx, "drain", old.Spec.NodeName, "--ignore-daemonsets", "--delete-emptydir-data",
		"--force", "--pod-selector="+a.selector(), "--timeout=2m")
	r.DrainTook = time.Since(t0)
	r.Warnings = e.warnings(ctx, ns)
	if err != nil {
		return r, fmt.Errorf("drain: %w", err)
	}
	drained := time.Now()
	if r.Before, err = follow.Wait(time.Minute); err != nil {
		return r, fmt.Errorf("log of the drained pod %s: %w", old.Name, err)
	}
	if during != nil {
		_ = during.Wait() // ends with the old pod
		if r.StateBefore == nil {
			r.StateBefore = map[string]string{}
		}
		r.StateBefore["during"] = duringOut.String()
	}
	if r.NewPod, err = e.replacement(ctx, ns, a, old); err != nil {
		r.Warnings = e.warnings(ctx, ns)
		return r, err
	}
	r.NewPodReadyAfter = time.Since(drained)
	r.RestoreEvent = e.waitRestoreEvent(ctx, ns, r.NewPod.Name, 30*time.Second)
	r.Manifest, _ = e.LatestManifest(ctx, r.NewPod)
	if a.Ticks > 0 {
		if r.After, err = e.WaitCount(ctx, ns, r.NewPod.Name, 0, time.Minute); err != nil {
			return r, err
		}
	}
	if a.Read != nil {
		if r.StateAfter, err = a.Read(ctx, e, r.NewPod); err != nil {
			return r, fmt.Errorf("read %s after the drain: %w", a.Name, err)
		}
	}
	r.Warnings = e.warnings(ctx, ns)
	return r, nil
}

func (a App) selector() string {
	if a.Kind == AppPod {
		return a.Selector
	}
	return "app=" + a.Name
}

func (e *Env) createClaims(ctx context.Context, ns string, claims map[string]string) error {
	for name, size := range claims {
		pvc := &corev1.PersistentVolumeClaim{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.PersistentVolumeClaimSpec{
				AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
				Resources:   corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(size)}},
			},
		}
		if _, err := e.Client.CoreV1().PersistentVolumeClaims(ns).Create(ctx, pvc, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("PVC %s: %w", name, err)
		}
	}
	return nil
}

// startApp creates the workload and returns its first Ready pod.
func (e *Env) startApp(ctx context.Context, ns string, a App) (*corev1.Pod, error) {
	if a.Kind == AppPod {
		if err := e.applyManifest(ctx, ns, a); err != nil {
			return nil, err
		}
		return e.WaitPodReady(ctx, ns, a.PodName, 3*time.Minute)
	}
	t := a.Template.DeepCopy()
	if t.Labels == nil {
		t.Labels = map[string]string{}
	}
	t.Labels["app"] = a.Name
	job := &batchv1.Job{ObjectMeta: metav1.ObjectMeta{Name: a.Name}, Spec: batchv1.JobSpec{Template: *t}}
	if _, err := e.Client.BatchV1().Jobs(ns).Create(ctx, job, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	return e.WaitJobPod(ctx, ns, a.Name, 3*time.Minute)
}

func (e *Env) applyManifest(ctx context.Context, ns string, a App) error {
	file := filepath.Join(e.Dir, ns+"-"+a.Name+".yaml")
	if err := os.WriteFile(file, []byte(a.Manifest), 0o600); err != nil {
		return err
	}
	_, err := e.Run(ctx, "-n", ns, "apply", "-f", file)
	return err
}

// replacement is the pod that takes over after the drain: the Job's next pod, or the plain pod
// the user applies again under the same name.
func (e *Env) replacement(ctx context.Context, ns string, a App, old *corev1.Pod) (*corev1.Pod, error) {
	if a.Kind == AppJob {
		return e.WaitJobPod(ctx, ns, a.Name, 3*time.Minute, old)
	}
	if err := e.applyManifest(ctx, ns, a); err != nil {
		return nil, err
	}
	return e.WaitPodReady(ctx, ns, a.PodName, 3*time.Minute)
}

// waitRestoreEvent waits for the pod's Restored or RestoreFailed Event ("" when none came).
func (e *Env) waitRestoreEvent(ctx context.Context, ns, pod string, timeout time.Duration) string {
	var found string
	_ = wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		evs, err := e.Client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + pod})
		if err != nil {
			return false, nil
		}
		for _, ev := range evs.Items {
			if ev.Reason == "Restored" || ev.Reason == "RestoreFailed" {
				found = ev.Reason + ": " + ev.Message
				return true, nil
			}
		}
		return false, nil
	})
	return found
}

// warnings lists the namespace's Warning Events, oldest first.
func (e *Env) warnings(ctx context.Context, ns string) []string {
	evs, err := e.Client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return []string{err.Error()}
	}
	sort.Slice(evs.Items, func(i, j int) bool { return evs.Items[i].LastTimestamp.Before(&evs.Items[j].LastTimestamp) })
	var out []string
	for _, ev := range evs.Items {
		if ev.Type == corev1.EventTypeWarning {
			out = append(out, fmt.Sprintf("%s %s: %s", ev.InvolvedObject.Name, ev.Reason, ev.Message))
		}
	}
	return out
}

// LatestManifest reads the newest complete checkpoint's manifest on the pod's checkpoint volume
// (host-path volumes of the local cluster).
func (e *Env) LatestManifest(ctx context.Context, pod *corev1.Pod) (*checkpoint.Manifest, error) {
	dir, err := e.CheckpointDir(ctx, pod)
	if err != nil {
		return nil, err
	}
	var best *checkpoint.Manifest
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.Name() != checkpoint.ManifestName {
			return nil
		}
		if _, err := os.Stat(filepath.Join(filepath.Dir(p), checkpoint.MarkerName)); err != nil {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		var m checkpoint.Manifest
		if json.Unmarshal(b, &m) == nil && (best == nil || m.Created.After(best.Created)) {
			best = &m
		}
		return nil
	})
	if best == nil && err == nil {
		err = fmt.Errorf("no complete checkpoint below %s", dir)
	}
	return best, err
}

// Exec runs a command in the pod's first container with kubectl exec and returns its stdout.
func (e *Env) Exec(ctx context.Context, pod *corev1.Pod, cmd ...string) (string, error) {
	c := e.execCmd(ctx, pod, cmd...)
	var stderr strings.Builder
	c.Stderr = &stderr
	out, err := c.Output()
	if err != nil {
		return string(out), fmt.Errorf("kubectl exec %s: %w: %s%s", strings.Join(cmd, " "), err, out, stderr.String())
	}
	return string(out), nil
}

func (e *Env) execCmd(ctx context.Context, pod *corev1.Pod, cmd ...string) *exec.Cmd {
	args := append([]string{"--kubeconfig", e.Kubeconfig, "-n", pod.Namespace, "exec", pod.Name, "-c", pod.Spec.Containers[0].Name, "--"}, cmd...)
	return exec.CommandContext(ctx, e.Kubectl, args...)
}

// ExecUntil retries Exec until it succeeds (a server still starting) or timeout passes.
func (e *Env) ExecUntil(ctx context.Context, pod *corev1.Pod, timeout time.Duration, cmd ...string) (string, error) {
	var out string
	var last error
	err := wait.PollUntilContextTimeout(ctx, 500*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		out, last = e.Exec(ctx, pod, cmd...)
		return last == nil, nil
	})
	if err != nil {
		return out, fmt.Errorf("after %s: %w", timeout, last)
	}
	return out, nil
}
