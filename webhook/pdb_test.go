package webhook

import (
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// The dump is skipped only where the eviction API certainly refuses: otherwise skipping would lose
// the app's progress.
func TestCertainRefusal(t *testing.T) {
	web := map[string]string{"tier": "web"}
	budget := func(name string, allowed, healthy, desired int32, mod ...func(*policyv1.PodDisruptionBudget)) policyv1.PodDisruptionBudget {
		b := policyv1.PodDisruptionBudget{ObjectMeta: metav1.ObjectMeta{Name: name, Generation: 1},
			Spec:   policyv1.PodDisruptionBudgetSpec{Selector: &metav1.LabelSelector{MatchLabels: web}},
			Status: policyv1.PodDisruptionBudgetStatus{ObservedGeneration: 1, DisruptionsAllowed: allowed, CurrentHealthy: healthy, DesiredHealthy: desired}}
		for _, m := range mod {
			m(&b)
		}
		return b
	}
	always := func(b *policyv1.PodDisruptionBudget) {
		p := policyv1.AlwaysAllow
		b.Spec.UnhealthyPodEvictionPolicy = &p
	}
	ready := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Labels: web},
		Status: corev1.PodStatus{Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}}
	unready := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Labels: web}}
	tests := []struct {
		name string
		pod  *corev1.Pod
		pdbs []policyv1.PodDisruptionBudget
		want string
	}{
		{"no budget", ready, nil, ""},
		{"a budget for other pods", ready, []policyv1.PodDisruptionBudget{{ObjectMeta: metav1.ObjectMeta{Name: "db"},
			Spec: policyv1.PodDisruptionBudgetSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"tier": "db"}}}}}, ""},
		{"room for a disruption", ready, []policyv1.PodDisruptionBudget{budget("web", 1, 2, 1)}, ""},
		{"no disruption allowed", ready, []policyv1.PodDisruptionBudget{budget("web", 0, 1, 1)}, "PodDisruptionBudget web allows no disruption"},
		{"two budgets", ready, []policyv1.PodDisruptionBudget{budget("a", 1, 2, 1), budget("b", 1, 2, 1)}, "2 PodDisruptionBudgets select the pod"},
		{"stale status", ready, []policyv1.PodDisruptionBudget{budget("web", 1, 2, 1, func(b *policyv1.PodDisruptionBudget) { b.Generation = 2 })},
			"PodDisruptionBudget web is still being processed"},
		{"unready pod, healthy budget: evictable", unready, []policyv1.PodDisruptionBudget{budget("web", 0, 1, 1)}, ""},
		{"unready pod, unhealthy budget", unready, []policyv1.PodDisruptionBudget{budget("web", 0, 0, 1)}, "PodDisruptionBudget web is unhealthy"},
		{"unready pod, AlwaysAllow", unready, []policyv1.PodDisruptionBudget{budget("web", 0, 0, 1, always)}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := certainRefusal(tt.pod, tt.pdbs)
			if tt.want == "" {
				assert.Empty(t, got)
			} else {
				assert.Contains(t, got, tt.want)
			}
		})
	}
}

// The cache says the budget allows no disruption, the API server says it allows one (the cache
// lags): the webhook dumps, since skipping would lose the app's progress if the eviction goes on.
func TestStaleBudgetCacheStillDumps(t *testing.T) {
	web := map[string]string{"tier": "web"}
	e := newEnv(t, Config{WaitBudget: 10e9, AgentRetryFor: -1}, []runtime.Object{userPVC("ckpt-pvc"), pdb("web", 1, web)})
	e.addPods(runningPod())
	require.NoError(t, e.pdbs.Add(pdb("web", 0, web)))
	code, _ := e.post(PathEviction, fixture(t, "eviction-v1.json"))
	assert.Equal(t, http.StatusOK, code)
	assert.Len(t, e.agent.Requests(), 1, "dumped on the fresh budget")
}
