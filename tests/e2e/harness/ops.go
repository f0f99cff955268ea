package harness

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/stasis-k8s/stasis/wiring"
)

// retryAfter429 is how kubectl drain treats a 429 from the eviction webhook: wait 5 s, retry.
const retryAfter429 = 5 * time.Second

// SetSuspend patches a Job's spec.suspend with kubectl, retrying while the suspend webhook answers
// 429 (a checkpoint still being written), as a user or controller would.
func (e *Env) SetSuspend(ctx context.Context, ns, job string, suspend bool) (time.Duration, error) {
	t0 := time.Now()
	patch := fmt.Sprintf(`{"spec":{"suspend":%v}}`, suspend)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		out, err := e.Run(ctx, "-n", ns, "patch", "job", job, "--type=merge", "-p", patch)
		if err == nil {
			return time.Since(t0), nil
		}
		if !(strings.Contains(out, "TooManyRequests") || strings.Contains(out, "429")) || time.Now().After(deadline) {
			return time.Since(t0), err
		}
		e.logf("suspend of %s answered 429 (checkpoint in progress); retrying in %s", job, retryAfter429)
		time.Sleep(retryAfter429)
	}
}

// Evict evicts a pod through the Eviction API, retrying 429s like kubectl drain, and waits until
// the pod is gone.
func (e *Env) Evict(ctx context.Context, ns, pod string) (time.Duration, error) {
	t0 := time.Now()
	ev := &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: pod, Namespace: ns}}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		err := e.Client.PolicyV1().Evictions(ns).Evict(ctx, ev)
		if err == nil {
			break
		}
		if !apierrors.IsTooManyRequests(err) || time.Now().After(deadline) {
			return time.Since(t0), fmt.Errorf("evict %s/%s: %w", ns, pod, err)
		}
		time.Sleep(retryAfter429)
	}
	return time.Since(t0), e.WaitPodGone(ctx, ns, pod, 2*time.Minute)
}

// WaitPodGone waits until the named pod no longer exists.
func (e *Env) WaitPodGone(ctx context.Context, ns, pod string, timeout time.Duration) error {
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		_, err := e.Client.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
		return apierrors.IsNotFound(err), nil
	})
	if err != nil {
		return fmt.Errorf("pod %s/%s still exists after %s", ns, pod, timeout)
	}
	return nil
}

// WaitNoActivePods waits until the Job has no pod left that is not finished or deleted.
func (e *Env) WaitNoActivePods(ctx context.Context, ns, job string, timeout time.Duration) error {
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		pods, err := e.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "batch.kubernetes.io/job-name=" + job})
		if err != nil {
			return false, nil
		}
		for _, p := range pods.Items {
			if p.Status.Phase == corev1.PodRunning || p.Status.Phase == corev1.PodPending {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("Job %s/%s still has running pods after %s", ns, job, timeout)
	}
	return nil
}

// CheckpointDir is the host path of a pod's checkpoint volume (local cluster): Stasis' own, or
// the one its checkpoint-storage-volume label names, else its first host-path PVC.
func (e *Env) CheckpointDir(ctx context.Context, pod *corev1.Pod) (string, error) {
	if e.Local == nil {
		return "", ErrNoLocal
	}
	var fallback string
	for _, v := range pod.Spec.Volumes {
		if v.PersistentVolumeClaim == nil {
			continue
		}
		pvc, err := e.Client.CoreV1().PersistentVolumeClaims(pod.Namespace).Get(ctx, v.PersistentVolumeClaim.ClaimName, metav1.GetOptions{})
		if err != nil {
			return "", err
		}
		pv, err := e.Client.CoreV1().PersistentVolumes().Get(ctx, pvc.Spec.VolumeName, metav1.GetOptions{})
		if err != nil {
			return "", err
		}
		if pv.Spec.HostPath == nil {
			continue
		}
		if v.Name == wiring.CheckpointVolume || v.Name == pod.Labels["memverge.ai/checkpoint-storage-volume"] {
			return pv.Spec.HostPath.Path, nil
		}
		if fallback == "" {
			fallback = pv.Spec.HostPath.Path
		}
	}
	if fallback == "" {
		return "", fmt.Errorf("pod %s/%s has no host-path checkpoint volume", pod.Namespace, pod.Name)
	}
	return fallback, nil
}

// largestFile is the largest regular file named *suffix below dir.
func largestFile(dir, suffix string) (string, int64, error) {
	var largest string
	var size int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() || !strings.HasSuffix(p, suffix) {
			return err
		}
		if info, err := d.Info(); err == nil && info.Size() > size {
			largest, size = p, info.Size()
		}
		return nil
	})
	return largest, size, err
}

// CorruptCheckpoint overwrites the middle of the largest CRIU image below dir (the memory pages)
// and returns the file it damaged.
func CorruptCheckpoint(dir string) (string, error) {
	largest, size, err := largestFile(dir, ".img")
	if err != nil {
		return "", err
	}
	if largest == "" {
		// Packed checkpoints: their images are chunks in the chunk store (.chunks) below dir.
		largest, size, err = largestFile(dir, ".pack")
		if err != nil {
			return "", err
		}
	}
	if largest == "" {
		return "", fmt.Errorf("no CRIU image nor pack file below %s", dir)
	}
	f, err := os.OpenFile(largest, os.O_WRONLY, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	junk := []byte(strings.Repeat("corrupted by the e2e test ", 160))
	if _, err := f.WriteAt(junk, size/2); err != nil {
		return "", err
	}
	return largest, f.Close()
}
