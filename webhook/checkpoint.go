package webhook

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/webhook/catalog"
	"github.com/stasis-k8s/stasis/webhook/inject"
	"github.com/stasis-k8s/stasis/wiring"
)

// Event reasons.
const (
	ReasonCheckpointed       = "Checkpointed"
	ReasonCheckpointRunning  = "CheckpointInProgress"
	ReasonCheckpointFailed   = "CheckpointFailed"
	ReasonCheckpointSkipped  = "CheckpointSkipped"
	ReasonWired              = "CheckpointWired"
	ReasonRestoring          = "Restoring"
	ReasonRefused            = "CheckpointConfigRefused"
	ReasonPodFailurePolicy   = "PodFailurePolicyAdded"
	ReasonNoPodFailurePolicy = "PodFailurePolicyNotAdded"
)

// target is one pod to checkpoint.
type target struct {
	pod      *corev1.Pod
	cfg      *labels.Config
	identity string
}

// podOutcome is what happened to one pod within the budget.
type podOutcome struct {
	t      target
	status agentapi.CheckpointStatus
	err    error // the agent could not be asked, or the checkpoint could not be recorded
}

func (o podOutcome) failed() bool { return o.err != nil || o.status.Phase == agentapi.PhaseFailed }
func (o podOutcome) succeeded() bool {
	return o.err == nil && o.status.Phase == agentapi.PhaseSucceeded
}

func (o podOutcome) failure() string {
	if o.err != nil {
		return o.err.Error()
	}
	if o.status.Message != "" {
		return o.status.Message
	}
	return "the agent reported the checkpoint as failed"
}

// checkpointAll asks the agents to checkpoint every target in parallel, waits up to the budget
// and turns the outcome into a verdict: all done → allow; one failed → the failure policy; an
// agent unavailable (for less than AgentRetryFor) → 429 with the reason; else 429 with progress.
// Events go to each pod and, when set, to subject (the suspended Job).
func (w *Webhook) checkpointAll(ctx context.Context, webhookID, reason string, subject runtime.Object, subjectName string, targets []target) verdict {
	t0 := w.d.Now()
	outs := w.checkpointEach(ctx, reason, targets)
	s := w.sortOutcomes(outs)
	if len(s.failed) == 0 && len(s.unavailable) > 0 {
		return w.holdForAgents(webhookID, reason, outs, s.unavailable)
	}
	r := round{webhookID: webhookID, reason: reason, subject: subject, subjectName: subjectName,
		targets: targets, outs: outs, sorted: s, took: w.d.Now().Sub(t0).Seconds()}
	switch {
	case len(s.failed) > 0:
		return w.failedVerdict(r)
	case len(s.running) > 0:
		return w.inProgressVerdict(r)
	default:
		return w.doneVerdict(r)
	}
}

// round is one checkpointAll: what was asked and what came of it.
type round struct {
	webhookID, reason string
	subject           runtime.Object
	subjectName       string
	targets           []target
	outs              []podOutcome
	sorted
	took float64 // seconds
}

// sorted is the outcomes of a round by kind.
type sorted struct {
	failed, running []podOutcome
	unavailable     []string // messages of pods whose agent is unavailable, still within AgentRetryFor
	written         int64
}

// checkpointEach runs checkpointPod for every target at once, under one wait budget.
func (w *Webhook) checkpointEach(ctx context.Context, reason string, targets []target) []podOutcome {
	bctx, cancel := context.WithTimeout(ctx, w.cfg.WaitBudget)
	defer cancel()
	outs := make([]podOutcome, len(targets))
	var wg sync.WaitGroup
	for i, t := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			outs[i] = w.checkpointPod(ctx, bctx, reason, t)
		}()
	}
	wg.Wait()
	return outs
}

// sortOutcomes sorts the outcomes. An unavailable agent counts as passing trouble for
// AgentRetryFor per pod, then as a failure (the failure policy applies).
func (w *Webhook) sortOutcomes(outs []podOutcome) sorted {
	var s sorted
	for _, o := range outs {
		s.written += o.status.BytesWritten
		uid := string(o.t.pod.UID)
		if o.err != nil && transient(o.err) {
			if d := w.unavail.seen(uid, w.d.Now()); d < w.cfg.AgentRetryFor {
				s.unavailable = append(s.unavailable, unavailableMessage(o, d, w.cfg.AgentRetryFor))
				continue
			}
		} else {
			w.unavail.clear(uid)
		}
		switch {
		case o.failed():
			s.failed = append(s.failed, o)
		case !o.succeeded():
			s.running = append(s.running, o)
		}
	}
	return s
}

// holdForAgents answers passing trouble with 429, like a dump in progress: the evicting client
// retries.
func (w *Webhook) holdForAgents(webhookID, reason string, outs []podOutcome, unavailable []string) verdict {
	w.metrics.tooMany.WithLabelValues(webhookID).Inc()
	for _, o := range outs {
		if o.err != nil && transient(o.err) {
			w.d.Events.Eventf(o.t.pod, corev1.EventTypeWarning, ReasonCheckpointRunning, "%s held: %v; retrying", reason, o.err)
		}
	}
	return deny(http.StatusTooManyRequests, metav1.StatusReasonTooManyRequests, "%s", strings.Join(unavailable, "; "))
}

// failedVerdict applies the failure policy to a round where a checkpoint failed.
func (w *Webhook) failedVerdict(r round) verdict {
	w.metrics.checkpointWait.WithLabelValues(r.webhookID, "failed").Observe(r.took)
	w.metrics.failures.WithLabelValues(r.webhookID, w.cfg.FailurePolicy).Inc()
	var msgs []string
	for _, o := range r.failed {
		m := fmt.Sprintf("checkpoint of pod %s/%s failed: %s", o.t.pod.Namespace, o.t.pod.Name, o.failure())
		msgs = append(msgs, m)
		if w.cfg.FailurePolicy == FailOpen {
			w.d.Events.Eventf(o.t.pod, corev1.EventTypeWarning, ReasonCheckpointFailed, "%s; allowed (%s): progress since the last checkpoint will be lost", m, FailOpen)
		} else {
			w.d.Events.Eventf(o.t.pod, corev1.EventTypeWarning, ReasonCheckpointFailed, "%s; %s refused (%s)", m, r.reason, FailClosed)
		}
	}
	msg := strings.Join(msgs, "; ")
	if r.subject != nil {
		w.d.Events.Eventf(r.subject, corev1.EventTypeWarning, ReasonCheckpointFailed, "%s refused: %s", r.reason, msg)
	}
	if w.cfg.FailurePolicy == FailOpen {
		return allow("", fmt.Sprintf("%s; allowed by failure policy %s: progress will be lost", msg, FailOpen))
	}
	return deny(http.StatusForbidden, metav1.StatusReasonForbidden, "%s (failure policy %s)", msg, FailClosed)
}

// inProgressVerdict answers 429 with the progress of the dumps still running.
func (w *Webhook) inProgressVerdict(r round) verdict {
	w.metrics.checkpointWait.WithLabelValues(r.webhookID, "in-progress").Observe(r.took)
	w.metrics.tooMany.WithLabelValues(r.webhookID).Inc()
	var msg string
	if len(r.targets) == 1 {
		p := r.targets[0].pod
		msg = fmt.Sprintf("checkpoint of pod %s/%s in progress: %s, retry", p.Namespace, p.Name, progressOf(r.outs[0].status))
	} else {
		msg = fmt.Sprintf("checkpoint of %d pods of %s in progress (%d of %d done): %s written, retry",
			len(r.targets), r.subjectName, len(r.targets)-len(r.running), len(r.targets), agentapi.HumanBytes(r.written))
	}
	for _, o := range r.running {
		w.d.Events.Eventf(o.t.pod, corev1.EventTypeNormal, ReasonCheckpointRunning, "checkpoint for %s in progress: %s written", r.reason, agentapi.HumanBytes(o.status.BytesWritten))
	}
	if r.subject != nil {
		w.d.Events.Eventf(r.subject, corev1.EventTypeNormal, ReasonCheckpointRunning, "%s", msg)
	}
	// No Retry-After: client-go would retry by itself (ten times) and kubectl drain would
	// neither show the progress nor wait its own 5 s between attempts.
	return deny(http.StatusTooManyRequests, metav1.StatusReasonTooManyRequests, "%s", msg)
}

// doneVerdict allows: every pod is checkpointed and recorded.
func (w *Webhook) doneVerdict(r round) verdict {
	w.metrics.checkpointWait.WithLabelValues(r.webhookID, "done").Observe(r.took)
	for _, o := range r.outs {
		w.d.Events.Eventf(o.t.pod, corev1.EventTypeNormal, ReasonCheckpointed, "checkpointed for %s on node %s: %s", r.reason, o.status.Node, agentapi.HumanBytes(o.status.BytesWritten))
	}
	if r.subject != nil {
		w.d.Events.Eventf(r.subject, corev1.EventTypeNormal, ReasonCheckpointed, "checkpointed %d pods for %s: %s", len(r.targets), r.reason, agentapi.HumanBytes(r.written))
	}
	return allow("")
}

// checkpointPod starts (or joins) the agent's operation and polls it until it is done or the
// budget (bctx) runs out. Recording uses ctx, so a dump finished at the budget's end is recorded.
func (w *Webhook) checkpointPod(ctx, bctx context.Context, reason string, t target) podOutcome {
	out := podOutcome{t: t}
	base, err := w.d.Locate.URL(t.pod.Spec.NodeName)
	if err != nil {
		out.err = err
		return out
	}
	req := inject.CheckpointRequest(inject.WrappedOnly(t.cfg, t.pod), t.identity, w.cfg.KeepCheckpoints, t.pod)
	req.Pod = agentapi.PodRef{Namespace: t.pod.Namespace, Name: t.pod.Name, UID: string(t.pod.UID)}
	req.Reason = reason
	st, err := w.d.Agents.Checkpoint(bctx, base, req)
	for err == nil && !st.Phase.Done() {
		timer := time.NewTimer(w.cfg.PollInterval)
		select {
		case <-bctx.Done():
			timer.Stop()
			out.status = st
			return out
		case <-timer.C:
		}
		var next agentapi.CheckpointStatus
		next, err = w.d.Agents.Status(bctx, base, string(t.pod.UID))
		if err == nil {
			st = next
		}
	}
	out.status = st
	if err != nil {
		if bctx.Err() != nil && ctx.Err() == nil {
			// The budget ran out during a request to the agent: the dump (started or joined, the
			// agent keys it by pod UID) counts as in progress; the retry asks again.
			if out.status.Phase == "" {
				out.status.Phase = agentapi.PhasePending
			}
			return out
		}
		out.err = fmt.Errorf("agent on node %s: %w", t.pod.Spec.NodeName, err)
		return out
	}
	if st.Phase == agentapi.PhaseFailed {
		// Forget the failed operation (the agent thaws the pod) so that a later eviction or
		// suspend starts a fresh dump instead of joining this failure.
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if derr := w.d.Agents.Delete(dctx, base, string(t.pod.UID)); derr != nil && !agentapi.IsNotFound(derr) {
			w.d.Log.Warn().Err(derr).Str("pod", t.pod.Namespace+"/"+t.pod.Name).Msg("forgetting the failed checkpoint")
		}
		return out
	}
	if err := w.record(ctx, t, st); err != nil {
		out.err = err
	}
	return out
}

// record writes the complete checkpoint on the checkpoint PVC. Only a checkpoint with an ID for
// every requested container is recorded; anything less is a failure.
func (w *Webhook) record(ctx context.Context, t target, st agentapi.CheckpointStatus) error {
	rec := catalog.Record{Identity: t.identity, Node: st.Node, Size: st.BytesWritten, PodUID: string(t.pod.UID),
		Containers: map[string]string{}}
	if rec.Node == "" {
		rec.Node = t.pod.Spec.NodeName
	}
	rec.Time = w.d.Now().UTC()
	if st.FinishedAt != nil {
		rec.Time = st.FinishedAt.UTC()
	}
	for _, c := range st.Containers {
		if c.Phase == agentapi.PhaseSucceeded && c.CheckpointID != "" {
			rec.Containers[c.Name] = c.CheckpointID
			rec.Generation = max(rec.Generation, c.Generation)
			if rec.ID == "" {
				rec.ID = c.CheckpointID
			}
		}
	}
	for _, c := range t.cfg.Containers {
		if rec.Containers[c.Name] == "" {
			return fmt.Errorf("the agent reported success but gave no complete checkpoint for container %q; not recorded", c.Name)
		}
	}
	pvc, err := checkpointPVC(t.pod, t.cfg)
	if err != nil {
		return err
	}
	return w.evict.store.Save(ctx, t.pod.Namespace, pvc, rec)
}

// checkpointPVC is the claim name of the pod's checkpoint volume.
func checkpointPVC(pod *corev1.Pod, cfg *labels.Config) (string, error) {
	vol := cfg.StorageVolume
	if vol == "" {
		vol = wiring.CheckpointVolume
	}
	for _, v := range pod.Spec.Volumes {
		if v.Name == vol {
			if v.PersistentVolumeClaim == nil {
				return "", fmt.Errorf("checkpoint volume %q of pod %s/%s is not a persistentVolumeClaim", vol, pod.Namespace, pod.Name)
			}
			return v.PersistentVolumeClaim.ClaimName, nil
		}
	}
	return "", fmt.Errorf("pod %s/%s has no checkpoint volume %q", pod.Namespace, pod.Name, vol)
}
