package webhook

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	admissionv1 "k8s.io/api/admission/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/utils/ptr"

	"github.com/stasis-k8s/stasis/labels"
)

func memContainer(name, limit, request string) corev1.Container {
	c := corev1.Container{Name: name, Image: "app"}
	if limit != "" {
		c.Resources.Limits = corev1.ResourceList{corev1.ResourceMemory: resource.MustParse(limit)}
	}
	if request != "" {
		c.Resources.Requests = corev1.ResourceList{corev1.ResourceMemory: resource.MustParse(request)}
	}
	return c
}

func TestGraceWarning(t *testing.T) {
	tests := []struct {
		name  string
		lbls  map[string]string
		cs    []corev1.Container
		grace *int64
		want  []string // substrings; nil: no warning
	}{
		{name: "4Gi in 10s at 200Mi/s: warned with the grace period that fits", cs: []corev1.Container{memContainer("app", "4Gi", "")}, grace: ptr.To[int64](10),
			want: []string{"terminationGracePeriodSeconds 10 leaves 7s", "a dump of 4.0 GiB", "about 22.5s at the assumed 200Mi/s plus 2s", "at least 26"}},
		{name: "512Mi in the default 30s: fits", cs: []corev1.Container{memContainer("app", "512Mi", "")}},
		{name: "512Mi in 5s: 4.6s needed, 2s left", cs: []corev1.Container{memContainer("app", "512Mi", "")}, grace: ptr.To[int64](5),
			want: []string{"leaves 2s", "at least 8"}},
		{name: "a request counts when there is no limit", cs: []corev1.Container{memContainer("app", "", "2Gi")}, grace: ptr.To[int64](10),
			want: []string{"a dump of 2.0 GiB"}},
		{name: "the limit wins over the request", cs: []corev1.Container{memContainer("app", "1Gi", "256Mi")}, grace: ptr.To[int64](5),
			want: []string{"a dump of 1.0 GiB"}},
		{name: "unknown memory: no estimate, no warning", cs: []corev1.Container{memContainer("app", "", "")}, grace: ptr.To[int64](1)},
		{name: "containers not checkpointed do not count", lbls: map[string]string{"memverge.ai/checkpoint-containers": "app"},
			cs: []corev1.Container{memContainer("app", "256Mi", ""), memContainer("cache", "64Gi", "")}, grace: ptr.To[int64](10)},
		{name: "checkpointed containers add up", cs: []corev1.Container{memContainer("app", "2Gi", ""), memContainer("side", "2Gi", "")}, grace: ptr.To[int64](10),
			want: []string{"a dump of 4.0 GiB"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lbls := map[string]string{"memverge.ai/checkpoint-mode": "true"}
			for k, v := range tt.lbls {
				lbls[k] = v
			}
			spec := &corev1.PodSpec{Containers: tt.cs, TerminationGracePeriodSeconds: tt.grace}
			cfg, err := labels.Parse("memverge.ai", lbls, nil, spec)
			require.NoError(t, err)
			msg := graceWarning(cfg, spec, DefaultDumpSpeed, DefaultDumpOverhead)
			if tt.want == nil {
				assert.Empty(t, msg)
				return
			}
			for _, w := range tt.want {
				assert.Contains(t, msg, w)
			}
		})
	}
}

// The speed and overhead come from the flags: 4Gi at 1Gi/s plus 1s fits in 10 s.
func TestGraceWarningSpeedFromFlags(t *testing.T) {
	spec := &corev1.PodSpec{Containers: []corev1.Container{memContainer("app", "4Gi", "")}, TerminationGracePeriodSeconds: ptr.To[int64](10)}
	cfg, err := labels.Parse("memverge.ai", map[string]string{"memverge.ai/checkpoint-mode": "true"}, nil, spec)
	require.NoError(t, err)
	assert.Empty(t, graceWarning(cfg, spec, 1<<30, time.Second))
	assert.NotEmpty(t, graceWarning(cfg, spec, 100<<20, time.Second))

	_, c, _, err := parseFlags([]string{"--tools-image=x", "--tls-cert-file=c", "--tls-key-file=k", "--dump-speed=1Gi", "--dump-overhead=1s"})
	require.NoError(t, err)
	assert.Equal(t, int64(1<<30), c.DumpSpeed)
	assert.Equal(t, time.Second, c.DumpOverhead)
	_, c, _, err = parseFlags([]string{"--tools-image=x", "--tls-cert-file=c", "--tls-key-file=k"})
	require.NoError(t, err)
	assert.Equal(t, int64(DefaultDumpSpeed), c.DumpSpeed)
	_, _, _, err = parseFlags([]string{"--tools-image=x", "--tls-cert-file=c", "--tls-key-file=k", "--dump-speed=fast"})
	assert.ErrorContains(t, err, `--dump-speed "fast" is not a positive size per second`)
}

// Through the handler: the pod is admitted and wired, the answer carries the warning (kubectl
// prints admission warnings), an Event on the pod's controller says the same; our reinvocation
// (the wired pod) does not warn again.
func TestPodMutateWarnsShortGracePeriod(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	p := reviewObject[corev1.Pod](t, fixture(t, "pod-create-job-command.json"))
	p.Spec.Containers[0].Resources.Limits[corev1.ResourceMemory] = resource.MustParse("4Gi")
	p.Spec.TerminationGracePeriodSeconds = ptr.To[int64](10)
	resp, patched := e.admit(PathMutatePod, podReview(t, p, false))
	require.True(t, resp.Allowed, "a short grace period is never refused")
	require.NotNil(t, patched, "the pod is wired")
	require.Len(t, resp.Warnings, 1)
	assert.True(t, strings.HasPrefix(resp.Warnings[0], "stasis: terminationGracePeriodSeconds 10 leaves 7s"), resp.Warnings[0])
	var warned []string
	for _, ev := range e.drainEvents() {
		if strings.HasPrefix(ev, "Warning "+ReasonGracePeriodShort+" ") {
			warned = append(warned, ev)
		}
	}
	assert.Len(t, warned, 1, "one Event: %q", e.events)

	var wired corev1.Pod
	require.NoError(t, json.Unmarshal(patched, &wired))
	again, _ := e.admit(PathMutatePod, podReview(t, &wired, false))
	assert.True(t, again.Allowed)
	assert.Empty(t, again.Warnings, "the reinvocation does not warn twice")

	// The fixture as it is (512Mi, 30 s): no warning.
	resp, _ = e.admit(PathMutatePod, fixture(t, "pod-create-job-command.json"))
	assert.Empty(t, resp.Warnings)
}

// The user who applies a Job or a Deployment sees the warning (the pod's own goes to the
// controller that creates it): through the Job and Deployment handlers.
func TestTemplateGraceWarningOnJobAndDeployment(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	job := replaceOnce(string(fixture(t, "job-create.json")), `"restartPolicy": "Never"`,
		`"restartPolicy": "Never", "terminationGracePeriodSeconds": 10`)
	resp, patched := e.admit(PathMutateJob, []byte(job))
	require.True(t, resp.Allowed)
	assert.NotNil(t, patched, "the podFailurePolicy is still added")
	assert.Empty(t, resp.Warnings, "no memory in the template: no estimate")
	resp, patched = e.admit(PathMutateJob, []byte(replaceOnce(job, `"resources": {}`, `"resources": {"limits": {"memory": "4Gi"}}`)))
	require.True(t, resp.Allowed)
	assert.NotNil(t, patched)
	require.Len(t, resp.Warnings, 1)
	assert.Contains(t, resp.Warnings[0], "stasis: pod template: terminationGracePeriodSeconds 10 leaves 7s to checkpoint on termination, but a dump of 4.0 GiB")

	d := deployment(true, appsv1.DeploymentStrategy{Type: appsv1.RecreateDeploymentStrategyType})
	d.Spec.Template.Spec.TerminationGracePeriodSeconds = ptr.To[int64](10)
	d.Spec.Template.Spec.Containers[0] = memContainer("counter", "8Gi", "")
	resp, patched = e.admit(PathMutateDeployment, deploymentReview(t, d, admissionv1.Update))
	require.True(t, resp.Allowed)
	assert.Nil(t, patched, "already Recreate: nothing to change")
	require.Len(t, resp.Warnings, 1)
	assert.Contains(t, resp.Warnings[0], "stasis: pod template: terminationGracePeriodSeconds 10 leaves 7s")

	d.Spec.Template.Spec.TerminationGracePeriodSeconds = ptr.To[int64](60)
	resp, _ = e.admit(PathMutateDeployment, deploymentReview(t, d, admissionv1.Update))
	assert.Empty(t, resp.Warnings)
}
