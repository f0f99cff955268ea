package webhook

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
)

func TestMalformedRequests(t *testing.T) {
	e := newEnv(t, Config{MaxBodyBytes: 64 << 10}, nil)
	huge := append([]byte(`{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x","object":{"pad":"`),
		bytes.Repeat([]byte("a"), 70<<10)...)
	huge = append(huge, []byte(`"}}}`)...)
	tests := []struct {
		name        string
		path        string
		method      string
		contentType string
		body        string
		code        int
		msg         string
	}{
		{name: "empty body", path: PathEviction, body: "", code: 400, msg: "empty body: expected an AdmissionReview"},
		{name: "not JSON", path: PathEviction, body: "<xml/>", code: 400, msg: "body is not an AdmissionReview JSON object"},
		{name: "JSON array", path: PathMutatePod, body: "[1,2]", code: 400, msg: "body is not an AdmissionReview JSON object"},
		{name: "truncated", path: PathEviction, body: string(fixture(t, "eviction-v1.json")[:120]), code: 400, msg: "body is not an AdmissionReview JSON object"},
		{name: "wrong kind", path: PathEviction, body: `{"apiVersion":"admission.k8s.io/v1","kind":"Pod"}`, code: 400, msg: `kind "Pod" is not AdmissionReview`},
		{name: "unknown version", path: PathEviction, body: `{"apiVersion":"admission.k8s.io/v2","kind":"AdmissionReview","request":{"uid":"a"}}`, code: 400,
			msg: `apiVersion "admission.k8s.io/v2" is not admission.k8s.io/v1 or admission.k8s.io/v1beta1`},
		{name: "no request", path: PathMutatePod, body: `{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}`, code: 400, msg: "AdmissionReview has no request"},
		{name: "no request v1beta1", path: PathMutatePod, body: `{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":null}`, code: 400, msg: "AdmissionReview has no request"},
		{name: "no uid", path: PathMutatePod, body: `{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"operation":"CREATE"}}`, code: 400, msg: "request.uid is empty"},
		{name: "request of wrong type", path: PathMutatePod, body: `{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":"x"}`, code: 400, msg: "AdmissionReview admission.k8s.io/v1: json: cannot unmarshal"},
		{name: "no object", path: PathEviction, body: `{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"a"}}`, code: 400, msg: "request.object is empty: expected a policy Eviction"},
		{name: "object of wrong shape", path: PathMutatePod, body: `{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"a","object":{"spec":{"containers":"nope"}}}}`,
			code: 400, msg: "request.object is not a v1 Pod: json: cannot unmarshal string into Go struct field PodSpec.spec.containers"},
		{name: "job update without old object", path: PathJobSuspend, body: `{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"a","object":{"spec":{}}}}`,
			code: 400, msg: "request.oldObject is empty: expected a batch/v1 Job"},
		{name: "oversized", path: PathEviction, body: string(huge), code: 413, msg: "admission request larger than 65536 bytes"},
		{name: "GET", path: PathEviction, method: http.MethodGet, code: 405, msg: "method GET not allowed: POST an AdmissionReview"},
		{name: "wrong content type", path: PathEviction, contentType: "text/plain", body: string(fixture(t, "eviction-v1.json")), code: 415, msg: `content type "text/plain" is not application/json`},
		{name: "unknown path", path: "/validate/other", body: string(fixture(t, "eviction-v1.json")), code: 404, msg: "404 page not found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			method := tt.method
			if method == "" {
				method = http.MethodPost
			}
			req, err := http.NewRequest(method, e.srv.URL+tt.path, strings.NewReader(tt.body))
			require.NoError(t, err)
			ct := tt.contentType
			if ct == "" {
				ct = "application/json"
			}
			req.Header.Set("Content-Type", ct)
			resp, err := e.srv.Client().Do(req)
			require.NoError(t, err)
			defer resp.Body.Close()
			var b bytes.Buffer
			_, _ = b.ReadFrom(resp.Body)
			assert.Equal(t, tt.code, resp.StatusCode, b.String())
			assert.Contains(t, b.String(), tt.msg)
		})
	}
}

// FuzzDecodeReview: no input makes the decoding panic, and every accepted review has a request.
func FuzzDecodeReview(f *testing.F) {
	for _, name := range []string{"eviction-v1.json", "eviction-v1beta1.json", "job-suspend.json", "pod-create-job-command.json"} {
		b, err := readFixture(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}`))
	f.Add([]byte(`{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"u","object":null}}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, body []byte) {
		ar, err := DecodeReview(body)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("error without message")
			}
			return
		}
		if ar.OriginalAdmissionReview == nil || ar.ID == "" {
			t.Fatalf("accepted review without request or uid: %q", body)
		}
		// What the handler then does with the object must not panic either.
		_ = decodeObject[corev1.Pod]("v1 Pod", true)(&review{AdmissionReview: ar})
		_, _ = encodeResponse(ar, deny(429, "TooManyRequests", "x"), nil)
	})
}

func TestJobMutateHandler(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	resp, patched := e.admit(PathMutateJob, fixture(t, "job-create.json"))
	require.True(t, resp.Allowed)
	require.NotNil(t, patched, "a checkpointed Job gets the podFailurePolicy rule")
	// jsonpatch orders operations by map iteration: compare them as a set.
	var ops []map[string]any
	require.NoError(t, json.Unmarshal(resp.Patch, &ops))
	var want []map[string]any
	require.NoError(t, json.Unmarshal([]byte(`[{"op":"add","path":"/spec/podReplacementPolicy","value":"Failed"},`+
		`{"op":"add","path":"/spec/podFailurePolicy","value":{"rules":[{"action":"Ignore","onPodConditions":[{"type":"DisruptionTarget","status":"True"}]},`+
		`{"action":"Ignore","onExitCodes":{"operator":"In","values":[143]}}]}}]`), &want))
	assert.ElementsMatch(t, want, ops)
	var job batchv1.Job
	require.NoError(t, json.Unmarshal(patched, &job))
	require.NotNil(t, job.Spec.PodFailurePolicy)
	assert.Equal(t, []batchv1.PodFailurePolicyRule{IgnoreDisruptionRule, IgnoreTerminatedRule}, job.Spec.PodFailurePolicy.Rules)
	assert.True(t, containsEvent(e.drainEvents(), "Normal PodFailurePolicyAdded"))
}

func TestAddIgnoreDisruption(t *testing.T) {
	exitRule := batchv1.PodFailurePolicyRule{Action: batchv1.PodFailurePolicyActionFailJob,
		OnExitCodes: &batchv1.PodFailurePolicyOnExitCodesRequirement{Operator: batchv1.PodFailurePolicyOnExitCodesOpIn, Values: []int32{42}}}
	job := func(labels map[string]string, restart corev1.RestartPolicy, pfp *batchv1.PodFailurePolicy) *batchv1.Job {
		j := &batchv1.Job{}
		j.Spec.Template.Labels = labels
		j.Spec.Template.Spec.RestartPolicy = restart
		j.Spec.PodFailurePolicy = pfp
		return j
	}
	on := map[string]string{"memverge.ai/checkpoint-mode": "true"}
	tests := []struct {
		name      string
		job       *batchv1.Job
		changed   bool
		msg       string
		wantRules []batchv1.PodFailurePolicyRule
	}{
		{"not checkpointed", job(nil, corev1.RestartPolicyNever, nil), false, "", nil},
		{"added", job(on, corev1.RestartPolicyNever, nil), true, "added podFailurePolicy rules", []batchv1.PodFailurePolicyRule{IgnoreDisruptionRule, IgnoreTerminatedRule}},
		{"prepended to the user's rules", job(on, corev1.RestartPolicyNever, &batchv1.PodFailurePolicy{Rules: []batchv1.PodFailurePolicyRule{exitRule}}), true, "added",
			[]batchv1.PodFailurePolicyRule{IgnoreDisruptionRule, IgnoreTerminatedRule, exitRule}},
		{"already there", job(on, corev1.RestartPolicyNever, &batchv1.PodFailurePolicy{Rules: []batchv1.PodFailurePolicyRule{IgnoreDisruptionRule}}), false, "",
			[]batchv1.PodFailurePolicyRule{IgnoreDisruptionRule}},
		{"restartPolicy OnFailure: not possible", job(on, corev1.RestartPolicyOnFailure, nil), false, "podFailurePolicy not added: it needs restartPolicy Never", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			msg, changed := AddIgnoreDisruption("memverge.ai", tt.job)
			assert.Equal(t, tt.changed, changed)
			if tt.msg == "" {
				assert.Empty(t, msg)
			} else {
				assert.Contains(t, msg, tt.msg)
			}
			var rules []batchv1.PodFailurePolicyRule
			if tt.job.Spec.PodFailurePolicy != nil {
				rules = tt.job.Spec.PodFailurePolicy.Rules
			}
			assert.Equal(t, tt.wantRules, rules)
			if tt.changed && len(rules) == 1 {
				// With a podFailurePolicy the API server accepts only podReplacementPolicy Failed.
				require.NotNil(t, tt.job.Spec.PodReplacementPolicy)
				assert.Equal(t, batchv1.Failed, *tt.job.Spec.PodReplacementPolicy)
			}
		})
	}
}

func TestJobMutateOnFailureWarns(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	review := []byte(replaceOnce(string(fixture(t, "job-create.json")), `"restartPolicy": "Never"`, `"restartPolicy": "OnFailure"`))
	resp, patched := e.admit(PathMutateJob, review)
	assert.True(t, resp.Allowed)
	assert.Nil(t, patched)
	assert.Equal(t, []string{"stasis: podFailurePolicy not added: it needs restartPolicy Never; evicted or suspended pods will count against backoffLimit"}, resp.Warnings)
}
