// Package harness is what the e2e tests and `make demo` share: building the local images,
// installing Stasis from deploy/ into a cluster as a user would, and driving the scenarios against
// the counter application. It asserts nothing itself: it returns what happened (the app's own
// output, timings, sizes) and the callers judge it.
package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"

	"github.com/stasis-k8s/stasis/certs"
	"github.com/stasis-k8s/stasis/tests/cluster"
	"github.com/stasis-k8s/stasis/wiring"
)

// Env is a cluster the scenarios run against.
type Env struct {
	// Local is the local cluster, nil for a cluster given by a kubeconfig.
	Local      *cluster.Local
	Client     kubernetes.Interface
	Kubeconfig string
	// Kubectl is the kubectl of the Kubernetes build (v1.37).
	Kubectl string
	// Root is the repository root; Dir a scratch directory (the cluster directory for Local).
	Root, Dir string
	// CounterImage is the image of the counter app (cluster.CounterImage on the local cluster).
	CounterImage string
	// Logf receives progress lines (the demo prints them; tests log them).
	Logf func(format string, args ...any)
}

func (e *Env) logf(format string, args ...any) {
	if e.Logf != nil {
		e.Logf(format, args...)
	}
}

// Run runs kubectl against the cluster and returns its combined output.
func (e *Env) Run(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, e.Kubectl, append([]string{"--kubeconfig", e.Kubeconfig}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// BuildTestImages runs hack/testimages (cached by source hash) and returns the tarballs of the
// pause and counter images (the counter in two images, cluster.CounterImage and CounterImageV2).
func BuildTestImages(root string) ([]string, error) {
	cmd := exec.Command("go", "run", "./hack/testimages")
	cmd.Dir = root
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("hack/testimages: %w", err)
	}
	dir := strings.TrimSpace(string(out))
	return []string{filepath.Join(dir, "pause.tar"), filepath.Join(dir, "counter.tar"), filepath.Join(dir, "counter-v2.tar")}, nil
}

// Image names of deploy/overlays/local (the overlay changes nothing else).
const (
	LocalWebhookImage = "stasis.local/stasis-webhook:dev"
	LocalAgentImage   = "stasis.local/stasis-agent:dev"
)

// StasisImages assembles the stasis-webhook and stasis-agent images from bin/stasis (`make build`)
// and the CRIU bundle (`make criu`) with hack/image (no Docker, no registry) into outDir, named as
// deploy/overlays/local expects, and returns their tarballs.
func StasisImages(root, outDir string) ([]string, error) {
	bin := filepath.Join(root, "bin", "stasis")
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("%s missing: run `make build`", bin)
	}
	cmd := exec.Command("go", "run", "./hack/image", "--out", outDir, "--stasis", bin,
		"--webhook-image", LocalWebhookImage, "--agent-image", LocalAgentImage)
	cmd.Dir = root
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("hack/image: %w", err)
	}
	var tars []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(l); len(f) == 2 {
			tars = append(tars, f[1])
		}
	}
	if len(tars) != 2 {
		return nil, fmt.Errorf("hack/image printed %q, expected two \"<ref> <file>\" lines", out)
	}
	return tars, nil
}

// StasisNamespace is where deploy/ installs Stasis.
const StasisNamespace = "stasis-system"

// InstallStasis installs Stasis as a user without cert-manager would: `stasis certs` makes the TLS
// material for the no-cert-manager overlay, and `kubectl apply -k deploy/overlays/local` applies it
// (a copy of deploy/ in Dir, so the repository stays clean). It returns once the webhook is
// available, an agent is ready on every node and the API server calls the webhook.
func (e *Env) InstallStasis(ctx context.Context, overlay string) error {
	t0 := time.Now()
	deploy := filepath.Join(e.Dir, "deploy")
	if err := os.RemoveAll(deploy); err != nil {
		return err
	}
	if err := copyTree(filepath.Join(e.Root, "deploy"), deploy); err != nil {
		return err
	}
	if err := certs.Make(ctx, certs.Config{
		OutDir:     filepath.Join(deploy, "overlays", "no-cert-manager", "tls"),
		Validity:   7 * 24 * time.Hour,
		CAValidity: 14 * 24 * time.Hour,
	}); err != nil {
		return fmt.Errorf("stasis certs: %w", err)
	}
	if overlay == "" {
		overlay = "local"
	}
	if _, err := e.Run(ctx, "apply", "-k", filepath.Join(deploy, "overlays", overlay)); err != nil {
		return err
	}
	if err := e.waitStasisReady(ctx); err != nil {
		return err
	}
	e.logf("Stasis installed from deploy/overlays/%s in %s", overlay, time.Since(t0).Round(100*time.Millisecond))
	return nil
}

func (e *Env) waitStasisReady(ctx context.Context) error {
	var last string
	err := wait.PollUntilContextTimeout(ctx, 500*time.Millisecond, 3*time.Minute, true, func(ctx context.Context) (bool, error) {
		dep, err := e.Client.AppsV1().Deployments(StasisNamespace).Get(ctx, "stasis-webhook", metav1.GetOptions{})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		if !deploymentAvailable(dep) {
			last = fmt.Sprintf("webhook Deployment: %d/%d available", dep.Status.AvailableReplicas, *dep.Spec.Replicas)
			return false, nil
		}
		ds, err := e.Client.AppsV1().DaemonSets(StasisNamespace).Get(ctx, "stasis-agent", metav1.GetOptions{})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		if ds.Status.DesiredNumberScheduled == 0 || ds.Status.NumberReady < ds.Status.DesiredNumberScheduled {
			last = fmt.Sprintf("agent DaemonSet: %d/%d ready", ds.Status.NumberReady, ds.Status.DesiredNumberScheduled)
			return false, nil
		}
		// A new webhook configuration takes effect a few seconds after creation: probe with a
		// dry-run pod that the mutating webhook must wire.
		wired, err := e.probeWiring(ctx)
		if !wired {
			last = fmt.Sprintf("dry-run pod not wired yet (%v)", err)
			return false, nil
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("Stasis not ready: %s\n%s", last, e.stasisPodsStatus(ctx))
	}
	return nil
}

func deploymentAvailable(d *appsv1.Deployment) bool {
	for _, c := range d.Status.Conditions {
		if c.Type == appsv1.DeploymentAvailable && c.Status == corev1.ConditionTrue {
			return d.Status.AvailableReplicas > 0
		}
	}
	return false
}

func (e *Env) probeWiring(ctx context.Context) (bool, error) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:   "stasis-probe",
			Labels: map[string]string{"memverge.ai/checkpoint-mode": "true", "memverge.ai/checkpoint-storage-volume": "ckpt"},
		},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{Name: "c", Image: e.CounterImage, Command: []string{"/counter"}}},
			Volumes: []corev1.Volume{{Name: "ckpt", VolumeSource: corev1.VolumeSource{
				PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "stasis-probe"}}}},
		},
	}
	got, err := e.Client.CoreV1().Pods(metav1.NamespaceDefault).Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	if err != nil {
		// A refusal by the webhook itself (the probe's claim does not exist) also proves that the
		// API server calls it; a failed call does not.
		msg := err.Error()
		return strings.Contains(msg, "stasis") && !strings.Contains(msg, "failed calling webhook"), err
	}
	return got.Annotations[wiring.AnnotationWired] == "true", nil
}

func (e *Env) stasisPodsStatus(ctx context.Context) string {
	pods, err := e.Client.CoreV1().Pods(StasisNamespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for i := range pods.Items {
		fmt.Fprintf(&b, "%s: %s\n", pods.Items[i].Name, PodStatus(&pods.Items[i]))
	}
	return b.String()
}

// PodStatus is a one-line summary of a pod for error messages.
func PodStatus(p *corev1.Pod) string {
	if p == nil {
		return "(none)"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "phase=%s node=%s", p.Status.Phase, p.Spec.NodeName)
	for _, cs := range append(append([]corev1.ContainerStatus{}, p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...) {
		fmt.Fprintf(&b, " [%s ready=%v restarts=%d", cs.Name, cs.Ready, cs.RestartCount)
		if w := cs.State.Waiting; w != nil {
			fmt.Fprintf(&b, " waiting %s: %s", w.Reason, w.Message)
		}
		if x := cs.State.Terminated; x != nil {
			fmt.Fprintf(&b, " terminated %s exit=%d: %s", x.Reason, x.ExitCode, x.Message)
		}
		b.WriteString("]")
	}
	return b.String()
}

// copyTree copies a folder of regular files.
func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		if !d.Type().IsRegular() {
			return nil
		}
		in, err := os.Open(p)
		if err != nil {
			return err
		}
		defer in.Close()
		out, err := os.Create(target)
		if err != nil {
			return err
		}
		if _, err := io.Copy(out, in); err != nil {
			out.Close()
			return err
		}
		return out.Close()
	})
}

// ErrNoLocal is returned by operations that need the local cluster (host paths of volumes).
var ErrNoLocal = errors.New("only on the local cluster")
