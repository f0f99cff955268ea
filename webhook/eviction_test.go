package webhook

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/tests/fakeagent"
	"github.com/stasis-k8s/stasis/webhook/catalog"
	"github.com/stasis-k8s/stasis/wiring"
)

// runningPod is the wired, running plain pod default/app with a user checkpoint volume.
func runningPod(mod ...func(*corev1.Pod)) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: "default", UID: "uid-app",
			Labels: map[string]string{"memverge.ai/checkpoint-mode": "true", "memverge.ai/checkpoint-storage-volume": "ckpt", "tier": "web"},
			Annotations: map[string]string{wiring.AnnotationIdentity: "pod/default/app", wiring.AnnotationWired: "true",
				"memverge.ai/checkpoint-files": "/var/lib/app/state.db"}},
		Spec: corev1.PodSpec{NodeName: "node-1",
			Containers: []corev1.Container{{Name: "main", Image: "app:1"}, {Name: "istio-proxy", Image: "proxy"}},
			Volumes:    []corev1.Volume{{Name: "ckpt", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "ckpt-pvc"}}}},
		},
		Status: corev1.PodStatus{Phase: corev1.PodRunning,
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
	}
	wireSpec(p, "pod/default/app")
	for _, m := range mod {
		m(p)
	}
	return p
}

// wireSpec writes what the pod webhook writes into the spec of a pod's checkpointed containers and
// the eviction and suspend webhooks read back: the launcher command and STASIS_IDENTITY.
func wireSpec(p *corev1.Pod, identity string) {
	cfg, err := labels.ParsePod(labels.DefaultPrefix, p)
	if err != nil {
		panic(err)
	}
	for i := range p.Spec.Containers {
		c := &p.Spec.Containers[i]
		if _, ok := cfg.Container(c.Name); ok {
			c.Command = wiring.LauncherCommand(c.Command)
			c.Env = []corev1.EnvVar{{Name: wiring.EnvIdentity, Value: identity}}
		}
	}
}

func userPVC(name string) *corev1.PersistentVolumeClaim {
	return &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", ResourceVersion: "1"}}
}

func pdb(name string, allowed int32, match map[string]string) *policyv1.PodDisruptionBudget {
	return &policyv1.PodDisruptionBudget{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec:   policyv1.PodDisruptionBudgetSpec{Selector: &metav1.LabelSelector{MatchLabels: match}},
		Status: policyv1.PodDisruptionBudgetStatus{DisruptionsAllowed: allowed}}
}

const evUID = "e1a0c6d2-0000-4000-8000-000000000001"

func v1Response(uid, inner string) string {
	return fmt.Sprintf(`{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","response":{"uid":%q,%s}}`, uid, inner)
}

func TestEvictionHandler(t *testing.T) {
	tests := []struct {
		name     string
		fixture  string
		pod      *corev1.Pod
		pdbs     []*policyv1.PodDisruptionBudget
		script   *fakeagent.Script
		policy   string
		noAgent  bool
		retryFor time.Duration // AgentRetryFor (0 here: -1, the policy at once)
		want     string        // exact response
		wantPost bool          // the agent was asked
		record   bool          // a record was written on ckpt-pvc
		event    string
	}{
		{
			name: "pod not in cache: allowed, agent not asked", fixture: "eviction-v1.json",
			want: v1Response(evUID, `"allowed":true,"status":{"metadata":{},"status":"Success","message":"pod is not checkpoint-enabled"}`),
		},
		{
			name: "pod not enabled", fixture: "eviction-v1.json",
			pod:  runningPod(func(p *corev1.Pod) { p.Labels["memverge.ai/checkpoint-mode"] = "false" }),
			want: v1Response(evUID, `"allowed":true,"status":{"metadata":{},"status":"Success","message":"pod is not checkpoint-enabled"}`),
		},
		{
			name: "pod not yet running", fixture: "eviction-v1.json",
			pod:  runningPod(func(p *corev1.Pod) { p.Status.Phase = corev1.PodPending }),
			want: v1Response(evUID, `"allowed":true,"status":{"metadata":{},"status":"Success","message":"pod is Pending: nothing to checkpoint"}`),
		},
		{
			name: "pod terminal", fixture: "eviction-v1.json",
			pod:  runningPod(func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded }),
			want: v1Response(evUID, `"allowed":true,"status":{"metadata":{},"status":"Success","message":"pod is Succeeded: nothing to checkpoint"}`),
		},
		{
			name: "pod terminating", fixture: "eviction-v1.json",
			pod:  runningPod(func(p *corev1.Pod) { p.DeletionTimestamp = &metav1.Time{} }),
			want: v1Response(evUID, `"allowed":true,"status":{"metadata":{},"status":"Success","message":"pod is terminating: nothing to checkpoint"}`),
		},
		{
			// Its annotations say wired (set by the user): the spec, which only admission wrote, says not.
			name: "pod not wired at creation (forged stasis.dev/wired): allowed with a warning, no dump", fixture: "eviction-v1.json",
			pod: runningPod(func(p *corev1.Pod) {
				p.Spec.Containers[0].Command, p.Spec.Containers[0].Env = []string{"/app"}, nil
			}),
			want:  v1Response(evUID, `"allowed":true,"warnings":["stasis: pod was not wired at creation; evicted without checkpoint"]`),
			event: "Warning CheckpointSkipped evicted without checkpoint",
		},
		{
			// The identity is re-derived (pod/default/app), never read from the annotation.
			name: "forged stasis.dev/identity annotation: dumped and recorded under the pod's own identity", fixture: "eviction-v1.json",
			pod:    runningPod(func(p *corev1.Pod) { p.Annotations[wiring.AnnotationIdentity] = "pod/default/victim" }),
			script: &fakeagent.Script{Polls: 1, Bytes: 1 << 20},
			want:   v1Response(evUID, `"allowed":true`), wantPost: true, record: true,
		},
		{
			// ownerReferences and the completion index are mutable metadata: re-pointing them after
			// creation must not redirect the checkpoint to another identity.
			name: "owner changed since creation: not checkpointed, failure policy", fixture: "eviction-v1.json",
			pod: runningPod(func(p *corev1.Pod) {
				p.OwnerReferences = []metav1.OwnerReference{{APIVersion: "batch/v1", Kind: "Job", Name: "other", UID: "uid-other", Controller: ptr.To(true)}}
				p.Annotations["batch.kubernetes.io/job-completion-index"] = "0"
			}),
			want: v1Response(evUID, `"allowed":false,"status":{"metadata":{},"status":"Failure","reason":"Forbidden","code":403,`+
				`"message":"pod default/app was wired as \"pod/default/app\" but its owner and name now give \"job/default/other/0\" (metadata changed since creation); not checkpointed (failure policy fail-closed)"}`),
			event: "Warning CheckpointFailed",
		},
		{
			name: "dump done within the budget: allowed and recorded", fixture: "eviction-v1.json",
			pod: runningPod(), script: &fakeagent.Script{Polls: 3, Bytes: 1 << 20},
			want:     v1Response(evUID, `"allowed":true`),
			wantPost: true, record: true, event: "Normal Checkpointed checkpointed for eviction on node node-1: 1.0 MiB",
		},
		{
			name: "dump still running at the budget: 429 with progress", fixture: "eviction-v1.json",
			pod: runningPod(), script: &fakeagent.Script{Polls: -1, Bytes: 1288490189},
			want: v1Response(evUID, `"allowed":false,"status":{"metadata":{},"status":"Failure","reason":"TooManyRequests","code":429,`+
				`"message":"checkpoint of pod default/app in progress: 1.2 GiB written, retry"}`),
			wantPost: true, event: "Normal CheckpointInProgress",
		},
		{
			name: "v1beta1 Eviction in a v1beta1 review: 429 too", fixture: "eviction-v1beta1.json",
			pod: runningPod(), script: &fakeagent.Script{Polls: -1, Bytes: 2048},
			want: `{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1beta1","response":{"uid":"e1a0c6d2-0000-4000-8000-000000000002",` +
				`"allowed":false,"status":{"metadata":{},"status":"Failure","reason":"TooManyRequests","code":429,` +
				`"message":"checkpoint of pod default/app in progress: 2.0 KiB written, retry"}}}`,
			wantPost: true,
		},
		{
			name: "v1beta1 Eviction, dump done", fixture: "eviction-v1beta1.json",
			pod: runningPod(), script: &fakeagent.Script{Polls: 1},
			want:     `{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1beta1","response":{"uid":"e1a0c6d2-0000-4000-8000-000000000002","allowed":true}}`,
			wantPost: true, record: true,
		},
		{
			name: "dump failed, fail-closed: denied with the agent's reason", fixture: "eviction-v1.json",
			pod: runningPod(), script: &fakeagent.Script{Polls: 2, Fail: `criu dump failed: "Error (criu/tty.c:1): tty: Unable to dump"`},
			want: v1Response(evUID, `"allowed":false,"status":{"metadata":{},"status":"Failure","reason":"Forbidden","code":403,`+
				`"message":"checkpoint of pod default/app failed: criu dump failed: \"Error (criu/tty.c:1): tty: Unable to dump\" (failure policy fail-closed)"}`),
			wantPost: true, event: "Warning CheckpointFailed checkpoint of pod default/app failed",
		},
		{
			name: "dump failed, fail-open: allowed, progress lost", fixture: "eviction-v1.json", policy: FailOpen,
			pod: runningPod(), script: &fakeagent.Script{Fail: "no space left on device"},
			want:     v1Response(evUID, `"allowed":true,"warnings":["checkpoint of pod default/app failed: no space left on device; allowed by failure policy fail-open: progress will be lost"]`),
			wantPost: true, event: "progress since the last checkpoint will be lost",
		},
		{
			name: "agent reports success without a container's checkpoint: failure, not recorded", fixture: "eviction-v1.json",
			pod: runningPod(), script: &fakeagent.Script{OmitContainer: "main"},
			want: v1Response(evUID, `"allowed":false,"status":{"metadata":{},"status":"Failure","reason":"Forbidden","code":403,`+
				`"message":"checkpoint of pod default/app failed: the agent reported success but gave no complete checkpoint for container \"main\"; not recorded (failure policy fail-closed)"}`),
			wantPost: true,
		},
		{
			name: "no agent on the node (restarting): 429, retried", fixture: "eviction-v1.json", noAgent: true, retryFor: time.Minute,
			pod: runningPod(),
			want: v1Response(evUID, `"allowed":false,"status":{"metadata":{},"status":"Failure","reason":"TooManyRequests","code":429,`+
				`"message":"agent for pod default/app unavailable for 0s (the failure policy applies after 1m0s): agent unavailable: no ready Stasis agent on node node-1 (selector app=stasis-agent); retry"}`),
			event: "eviction held: agent unavailable",
		},
		{
			name: "no agent on the node for longer than --agent-retry-for, fail-closed", fixture: "eviction-v1.json", noAgent: true,
			pod: runningPod(),
			want: v1Response(evUID, `"allowed":false,"status":{"metadata":{},"status":"Failure","reason":"Forbidden","code":403,`+
				`"message":"checkpoint of pod default/app failed: agent unavailable: no ready Stasis agent on node node-1 (selector app=stasis-agent) (failure policy fail-closed)"}`),
		},
		{
			name: "PDB allows no disruption: no dump, left to the API server", fixture: "eviction-v1.json",
			pod: runningPod(), pdbs: []*policyv1.PodDisruptionBudget{pdb("web", 0, map[string]string{"tier": "web"})},
			want:  v1Response(evUID, `"allowed":true,"status":{"metadata":{},"status":"Success","message":"PodDisruptionBudget web allows no disruption; left to the API server"}`),
			event: "Normal CheckpointSkipped",
		},
		{
			name: "PDB of other pods does not matter", fixture: "eviction-v1.json",
			pod: runningPod(), pdbs: []*policyv1.PodDisruptionBudget{pdb("db", 0, map[string]string{"tier": "db"}), pdb("web", 1, map[string]string{"tier": "web"})},
			want: v1Response(evUID, `"allowed":true`), wantPost: true, record: true,
		},
		{
			name: "kubectl drain --dry-run=server (deleteOptions.dryRun): nothing triggered", fixture: "eviction-deleteoptions-dryrun.json",
			pod:  runningPod(),
			want: v1Response("e1a0c6d2-0000-4000-8000-000000000003", `"allowed":true,"status":{"metadata":{},"status":"Success","message":"dry run: no checkpoint taken"}`),
		},
		{
			name: "request.dryRun: nothing triggered", fixture: "eviction-request-dryrun.json",
			pod:  runningPod(),
			want: v1Response("e1a0c6d2-0000-4000-8000-000000000004", `"allowed":true,"status":{"metadata":{},"status":"Success","message":"dry run: no checkpoint taken"}`),
		},
		{
			name: "labels changed to something invalid after creation: failure policy", fixture: "eviction-v1.json",
			pod: runningPod(func(p *corev1.Pod) { p.Labels["memverge.ai/checkpoint-containers"] = "gone" }),
			want: v1Response(evUID, `"allowed":false,"status":{"metadata":{},"status":"Failure","reason":"Forbidden","code":403,`+
				`"message":"checkpoint configuration of pod default/app is invalid: memverge.ai/checkpoint-containers: container \"gone\" is not in the pod (failure policy fail-closed)"}`),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := Config{FailurePolicy: tt.policy, WaitBudget: 10e9, AgentRetryFor: -1}
			if tt.retryFor > 0 {
				cfg.AgentRetryFor = tt.retryFor
			}
			if tt.script != nil && tt.script.Polls < 0 {
				cfg.WaitBudget = 50e6 // a dump that never ends: answer at the budget
			}
			var opts []envOption
			if tt.noAgent {
				opts = append(opts, func(_ *Config, d *Deps) {
					d.Locate = PodLocator{Pods: d.Pods.Pods("stasis-system"), Selector: mustSelector("app=stasis-agent"), Port: 9443}
				})
			}
			objs := []runtime.Object{userPVC("ckpt-pvc")}
			for _, p := range tt.pdbs {
				objs = append(objs, p) // read fresh by the webhook when its cache shows a budget
			}
			e := newEnv(t, cfg, objs, opts...)
			if tt.pod != nil {
				e.addPods(tt.pod)
			}
			for _, p := range tt.pdbs {
				require.NoError(t, e.pdbs.Add(p))
			}
			if tt.script != nil {
				e.agent.SetScript("default", "app", *tt.script)
			}
			code, body := e.post(PathEviction, fixture(t, tt.fixture))
			assert.Equal(t, http.StatusOK, code)
			assert.JSONEq(t, tt.want, body)
			if tt.wantPost {
				require.Len(t, e.agent.Requests(), 1)
				req := e.agent.Requests()[0]
				assert.Equal(t, "uid-app", req.Pod.UID)
				assert.Equal(t, "eviction", req.Reason)
				require.Len(t, req.Containers, 1, "istio-proxy is not checkpointed by default")
				assert.Equal(t, "main", req.Containers[0].Name)
				assert.Equal(t, "/stasis/checkpoints/pod_default_app/main", req.Containers[0].Dir)
				assert.Equal(t, []string{"/var/lib/app/state.db"}, req.Containers[0].Files)
			} else {
				assert.Empty(t, e.agent.Requests(), "the agent must not be asked")
			}
			pvc, err := e.client.CoreV1().PersistentVolumeClaims("default").Get(context.Background(), "ckpt-pvc", metav1.GetOptions{})
			require.NoError(t, err)
			rec, ok := catalog.RecordOf(pvc, "pod/default/app")
			assert.Equal(t, tt.record, ok, "record on the PVC")
			if tt.record {
				assert.Equal(t, map[string]string{"main": "ckpt-1"}, rec.Containers)
				assert.Equal(t, "node-1", rec.Node)
				assert.Equal(t, "uid-app", rec.PodUID)
			}
			if tt.event != "" {
				assert.True(t, containsEvent(e.drainEvents(), tt.event), "event %q", tt.event)
			}
		})
	}
}

// A retry (kubectl drain every 5 s, maybe on another replica) joins the dump in flight: the agent
// sees the same pod UID again and no second dump starts; once done, the retry is allowed.
func TestEvictionRetryJoinsDump(t *testing.T) {
	e := newEnv(t, Config{WaitBudget: 50e6}, []runtime.Object{userPVC("ckpt-pvc")})
	e.addPods(runningPod())
	e.agent.SetScript("default", "app", fakeagent.Script{Polls: -1, Bytes: 10})
	_, body := e.post(PathEviction, fixture(t, "eviction-v1.json"))
	assert.Contains(t, body, `"code":429`)
	_, body = e.post(PathEviction, fixture(t, "eviction-v1.json"))
	assert.Contains(t, body, `"code":429`)

	// The dump completes between two retries.
	e.agent.Finish("uid-app")
	_, body = e.post(PathEviction, fixture(t, "eviction-v1.json"))
	assert.JSONEq(t, v1Response(evUID, `"allowed":true`), body)
	assert.Equal(t, 3, e.agent.PostsFor("uid-app"), "every retry joins the same operation")
	st, ok := e.agent.Op("uid-app")
	require.True(t, ok)
	assert.Equal(t, "Succeeded", string(st.Phase))

	// A failed dump is forgotten at the agent so that a later eviction starts afresh.
	e2 := newEnv(t, Config{}, []runtime.Object{userPVC("ckpt-pvc")})
	e2.addPods(runningPod())
	e2.agent.SetScript("default", "app", fakeagent.Script{Fail: "boom"})
	_, body = e2.post(PathEviction, fixture(t, "eviction-v1.json"))
	assert.Contains(t, body, `"code":403`)
	assert.Equal(t, []string{"uid-app"}, e2.agent.Deleted())
}

// A newer record is never replaced by an older one, and a failed dump never touches the record.
func TestRecordKeepsNewest(t *testing.T) {
	e := newEnv(t, Config{}, []runtime.Object{userPVC("ckpt-pvc")})
	e.addPods(runningPod())
	e.agent.SetScript("default", "app", fakeagent.Script{CheckpointID: "ckpt-good"})
	_, body := e.post(PathEviction, fixture(t, "eviction-v1.json"))
	require.JSONEq(t, v1Response(evUID, `"allowed":true`), body)

	// Same pod name, new pod UID, failing dump.
	e.pods.Delete(runningPod())
	e.addPods(runningPod(func(p *corev1.Pod) { p.UID = types.UID("uid-app-2") }))
	e.agent.SetScript("default", "app", fakeagent.Script{Fail: "boom"})
	_, body = e.post(PathEviction, fixture(t, "eviction-v1.json"))
	assert.Contains(t, body, `"code":403`)
	pvc, err := e.client.CoreV1().PersistentVolumeClaims("default").Get(context.Background(), "ckpt-pvc", metav1.GetOptions{})
	require.NoError(t, err)
	rec, ok := catalog.RecordOf(pvc, "pod/default/app")
	require.True(t, ok)
	assert.Equal(t, "ckpt-good", rec.ID)

	raw, _ := json.Marshal(rec)
	assert.Contains(t, string(raw), `"identity":"pod/default/app"`)
}

// slowAgent answers only when the caller gives up (an agent busy past the budget).
type slowAgent struct{ AgentClient }

func (slowAgent) Checkpoint(ctx context.Context, _ string, _ agentapi.CheckpointRequest) (agentapi.CheckpointStatus, error) {
	<-ctx.Done()
	return agentapi.CheckpointStatus{}, ctx.Err()
}

// The budget running out while the agent has not even answered the start is "in progress" (429),
// not a failure: the agent keys the dump by pod UID and the retry joins it.
func TestEvictionBudgetEndsDuringAgentRequest(t *testing.T) {
	e := newEnv(t, Config{WaitBudget: 50e6}, []runtime.Object{userPVC("ckpt-pvc")}, func(_ *Config, d *Deps) { d.Agents = slowAgent{} })
	e.addPods(runningPod())
	_, body := e.post(PathEviction, fixture(t, "eviction-v1.json"))
	assert.JSONEq(t, v1Response(evUID, `"allowed":false,"status":{"metadata":{},"status":"Failure","reason":"TooManyRequests","code":429,`+
		`"message":"checkpoint of pod default/app in progress: 0 B written, retry"}`), body)
}
