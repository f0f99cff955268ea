package agent

import (
	"context"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/criurun"
)

// After a dump the app stays frozen until its pod is deleted (the launcher kills it then). The
// webhook asks about the operation while it holds the eviction or suspend, and stops once it has
// answered: if the pod is not being deleted some seconds after the last question, the API server
// refused the eviction after the webhook allowed it (a PodDisruptionBudget) or the suspend did
// not go through, and the app is thawed at once instead of after --freeze-timeout. A pod whose
// deletion has started is never thawed: its preStop hook or grace period may be running.

// PodStates tells whether a pod's deletion has started.
type PodStates interface {
	// Deleting is true when the pod has a deletionTimestamp, is gone, or its name now belongs to
	// another pod (another UID).
	Deleting(ctx context.Context, pod agentapi.PodRef) (bool, error)
}

// Deleting reads the pod once from the API server (needs RBAC: get pods).
func (k *kubeEvents) Deleting(ctx context.Context, pod agentapi.PodRef) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	p, err := k.client.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	return p.DeletionTimestamp != nil || string(p.UID) != pod.UID, nil
}

// touch records that the webhook asked about the operation while holding an admission review
// (it polls with Status or Wait until every pod of the review is done): the release clock starts
// again. Joining a finished operation (Start) does not count: see Start.
func (op *operation) touch(now time.Time) {
	op.mu.Lock()
	op.asked = now
	op.mu.Unlock()
}

// holdFrozen watches an operation whose apps are frozen after a successful dump, until they are
// thawed or their pod's deletion has started.
func (a *Agent) holdFrozen(op *operation, pod agentapi.PodRef) {
	frozenAt := a.cfg.Now()
	a.recordFrozen(op, frozenAt)
	a.holdFrozenSince(op, pod, frozenAt)
}

// holdFrozenSince is holdFrozen for apps frozen at frozenAt (by this agent or a previous one).
func (a *Agent) holdFrozenSince(op *operation, pod agentapi.PodRef, frozenAt time.Time) {
	op.touch(a.cfg.Now())
	tick := min(a.cfg.ReleaseAfter, a.cfg.FreezeTimeout) / 4
	deleting := false // once seen, the pod is not asked about again
	var check func()
	check = func() {
		now := a.cfg.Now()
		op.mu.Lock()
		asked, frozen := op.asked, op.frozen
		op.mu.Unlock()
		switch {
		case len(frozen) == 0:
			return // thawed
		case !anyAlive(frozen):
			a.forgetFrozen(pod.UID) // the pod was deleted and its launcher ended the app
			return
		case deleting:
		case now.Sub(frozenAt) >= a.cfg.FreezeTimeout:
			a.release(op, pod, fmt.Sprintf("pod not deleted within --freeze-timeout %s", a.cfg.FreezeTimeout))
			return
		case a.cfg.Pods != nil && now.Sub(asked) >= a.cfg.ReleaseAfter:
			var err error
			if deleting, err = a.cfg.Pods.Deleting(a.ctx, pod); err != nil {
				a.cfg.Log.Warn().Err(err).Str("uid", pod.UID).Msg("reading the frozen app's pod; asking again")
			} else if deleting {
				a.cfg.Log.Info().Str("uid", pod.UID).Msg("the pod is being deleted: its frozen app stays frozen until the launcher ends it")
			} else {
				a.release(op, pod, fmt.Sprintf("the pod was not deleted within %s after its checkpoint was last asked for (the eviction was refused after it, e.g. by a PodDisruptionBudget, or the suspend did not happen)", a.cfg.ReleaseAfter))
				return
			}
		}
		op.mu.Lock()
		op.timer = time.AfterFunc(tick, check)
		op.mu.Unlock()
	}
	op.mu.Lock()
	op.timer = time.AfterFunc(tick, check)
	op.mu.Unlock()
}

// anyAlive reports whether one of the frozen trees still exists.
func anyAlive(trees []frozenTree) bool {
	for _, t := range trees {
		if st, err := criurun.StartTime(t.pid); err == nil && st == t.start {
			return true
		}
	}
	return false
}

// release forgets the operation and thaws its apps: they run on, so the checkpoint is stale and
// the next request for this pod must dump again instead of joining this operation.
func (a *Agent) release(op *operation, pod agentapi.PodRef, why string) {
	a.forget(op, pod.UID)
	a.thaw(op, why)
}

// forget removes the operation for uid, if it is still op.
func (a *Agent) forget(op *operation, uid string) {
	a.mu.Lock()
	if a.ops[uid] == op {
		delete(a.ops, uid)
	}
	a.mu.Unlock()
}
