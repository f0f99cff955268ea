package harness

import (
	"context"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stasis-k8s/stasis/wiring"
)

// Drain runs `kubectl drain` on a node for the pods matching selector (the rest of the node, the
// Stasis webhook among it, is left alone so that scenarios do not disturb each other) and returns
// how long it took and what it printed.
func (e *Env) Drain(ctx context.Context, node, selector string, timeout time.Duration) (time.Duration, string, error) {
	t0 := time.Now()
	out, err := e.Run(ctx, "drain", node, "--ignore-daemonsets", "--delete-emptydir-data",
		"--pod-selector="+selector, "--timeout="+timeout.String())
	return time.Since(t0), out, err
}

// Uncordon makes a drained node schedulable again.
func (e *Env) Uncordon(ctx context.Context, node string) error {
	_, err := e.Run(ctx, "uncordon", node)
	return err
}

// OtherNode is a node of the cluster other than name.
func (e *Env) OtherNode(ctx context.Context, name string) (string, error) {
	nodes, err := e.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return "", err
	}
	for _, n := range nodes.Items {
		if n.Name != name {
			return n.Name, nil
		}
	}
	return "", fmt.Errorf("no node besides %s", name)
}

// DrainResult is what scenario 1 saw.
type DrainResult struct {
	Job              string
	OldPod, NewPod   *corev1.Pod
	Before, After    CounterOutput
	DrainTook        time.Duration
	DrainOutput      string
	NewPodReadyAfter time.Duration // from the end of the drain
	Restore          string        // the new pod's stasis.dev/restore annotation
	CheckpointBytes  int64         // size of the checkpoint volume's content (local cluster)
}

// JobDrain is scenario 1: a checkpoint-enabled counter Job counts to at least countBefore, its node
// is drained, and its replacement runs on another node. The Job is left running.
func (e *Env) JobDrain(ctx context.Context, ns string, s CounterSpec, countBefore int) (*DrainResult, error) {
	s.Checkpoint = true
	r := &DrainResult{Job: s.Name}
	if _, err := e.CreateCounterJob(ctx, ns, s); err != nil {
		return r, err
	}
	old, err := e.WaitJobPod(ctx, ns, s.Name, 3*time.Minute)
	if err != nil {
		return r, err
	}
	r.OldPod = old
	e.logf("pod %s Running on %s", old.Name, old.Spec.NodeName)
	follow := e.Follow(ctx, ns, old.Name)
	if _, err := e.WaitCount(ctx, ns, old.Name, countBefore, 2*time.Minute); err != nil {
		return r, err
	}
	e.logf("counter reached %d; draining %s", follow.Output().Last(), old.Spec.NodeName)
	r.DrainTook, r.DrainOutput, err = e.Drain(ctx, old.Spec.NodeName, "batch.kubernetes.io/job-name="+s.Name, 2*time.Minute)
	if err != nil {
		return r, err
	}
	drained := time.Now()
	if r.Before, err = follow.Wait(time.Minute); err != nil {
		return r, fmt.Errorf("log of the drained pod %s: %w", old.Name, err)
	}
	e.logf("drain took %s; the old pod printed up to %d", r.DrainTook.Round(10*time.Millisecond), r.Before.Last())
	if r.NewPod, err = e.WaitJobPod(ctx, ns, s.Name, 3*time.Minute, old); err != nil {
		return r, err
	}
	r.NewPodReadyAfter = time.Since(drained)
	r.Restore = r.NewPod.Annotations[wiring.AnnotationRestore]
	if r.After, err = e.WaitCount(ctx, ns, r.NewPod.Name, 0, time.Minute); err != nil {
		return r, err
	}
	e.logf("new pod %s Ready on %s %s after the drain; its first number: %d", r.NewPod.Name, r.NewPod.Spec.NodeName,
		r.NewPodReadyAfter.Round(10*time.Millisecond), r.After.First())
	r.CheckpointBytes, _ = e.CheckpointBytes(ctx, r.NewPod)
	return r, nil
}

// CheckpointBytes sums the files on a pod's checkpoint volume (host-path volumes of the local
// cluster only: both nodes share this machine's filesystem).
func (e *Env) CheckpointBytes(ctx context.Context, pod *corev1.Pod) (int64, error) {
	if e.Local == nil {
		return 0, ErrNoLocal
	}
	for _, v := range pod.Spec.Volumes {
		if v.PersistentVolumeClaim == nil || !(v.Name == wiring.CheckpointVolume || v.Name == pod.Labels["memverge.ai/checkpoint-storage-volume"]) {
			continue
		}
		pvc, err := e.Client.CoreV1().PersistentVolumeClaims(pod.Namespace).Get(ctx, v.PersistentVolumeClaim.ClaimName, metav1.GetOptions{})
		if err != nil {
			return 0, err
		}
		pv, err := e.Client.CoreV1().PersistentVolumes().Get(ctx, pvc.Spec.VolumeName, metav1.GetOptions{})
		if err != nil {
			return 0, err
		}
		if pv.Spec.HostPath == nil {
			return 0, fmt.Errorf("volume %s is not a hostPath volume", pv.Name)
		}
		var total int64
		err = filepath.WalkDir(pv.Spec.HostPath.Path, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				if info, err := d.Info(); err == nil {
					total += info.Size()
				}
			}
			return nil
		})
		return total, err
	}
	return 0, fmt.Errorf("pod %s has no checkpoint volume", pod.Name)
}

// Summary is the demo's and the tests' one-paragraph account of a drain.
func (r *DrainResult) Summary() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Job %s: pod %s on %s counted 0..%d; `kubectl drain %s` took %s.\n", r.Job,
		name(r.OldPod), node(r.OldPod), r.Before.Last(), node(r.OldPod), r.DrainTook.Round(10*time.Millisecond))
	fmt.Fprintf(&b, "Replacement pod %s on %s was Ready %s after the drain and printed %d first (fresh starts: %d).\n",
		name(r.NewPod), node(r.NewPod), r.NewPodReadyAfter.Round(10*time.Millisecond), r.After.First(), r.After.FreshStarts)
	if r.CheckpointBytes > 0 {
		fmt.Fprintf(&b, "Checkpoint volume: %.1f MiB.", float64(r.CheckpointBytes)/(1<<20))
	}
	if r.Restore != "" {
		fmt.Fprintf(&b, " Restore annotation: %s", r.Restore)
	}
	return b.String()
}

func name(p *corev1.Pod) string {
	if p == nil {
		return "?"
	}
	return p.Name
}

func node(p *corev1.Pod) string {
	if p == nil {
		return "?"
	}
	return p.Spec.NodeName
}
