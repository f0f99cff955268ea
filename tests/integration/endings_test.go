//go:build integration

package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// applyManifest writes a manifest into a file and applies it with kubectl; returns what kubectl
// printed (admission warnings included: kubectl prints them as "Warning: …").
func (s *scenario) applyManifest(name, manifest string) string {
	s.t.Helper()
	file := filepath.Join(s.t.TempDir(), name+".yaml")
	require.NoError(s.t, os.WriteFile(file, []byte(manifest), 0o600))
	out, err := s.kubectl("-n", s.ns, "apply", "-f", file)
	require.NoError(s.t, err, out)
	return out
}

const graceWarnPod = `apiVersion: v1
kind: Pod
metadata:
  name: NAME
  labels:
    memverge.ai/checkpoint-mode: "true"
    memverge.ai/checkpoint-storage-volume: checkpointing
spec:
  terminationGracePeriodSeconds: GRACE
  restartPolicy: Never
  containers:
  - name: app
    image: counter:integration
    imagePullPolicy: Never
    command: ["/counter"]
    resources:
      limits:
        memory: 4Gi
  volumes:
  - name: checkpointing
    persistentVolumeClaim:
      claimName: checkpointing-volume
`

// A checkpointed pod whose grace period cannot fit a dump of its memory (4Gi in 5 s at the
// default 200Mi/s): admitted and wired, kubectl prints the webhook's warning, and an Event on the
// pod says the same. With 60 s, nothing is printed.
func TestShortGracePeriodWarnsThroughKubectl_NoKubelet(t *testing.T) {
	s := newScenario(t, "endings-grace")
	s.createPVC("checkpointing-volume")
	out := s.applyManifest("short", strings.NewReplacer("NAME", "short", "GRACE", "5").Replace(graceWarnPod))
	t.Logf("kubectl apply printed:\n%s", out)
	assert.Contains(t, out, "Warning: stasis: terminationGracePeriodSeconds 5 leaves 2s to checkpoint on termination, but a dump of 4.0 GiB")
	assert.Contains(t, out, "set terminationGracePeriodSeconds to at least 26")
	assert.Contains(t, out, "pod/short created", "a warning, never a refusal")
	p, err := s.c.CoreV1().Pods(s.ns).Get(s.ctx, "short", metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, "true", p.Annotations["stasis.dev/wired"], "wired as usual")
	ev := s.waitEvent("Pod", "short", "terminationGracePeriodSeconds 5 leaves 2s")
	assert.Equal(t, "GracePeriodTooShort", ev.Reason)
	assert.Equal(t, "Warning", ev.Type)

	out = s.applyManifest("long", strings.NewReplacer("NAME", "long", "GRACE", "60").Replace(graceWarnPod))
	assert.NotContains(t, out, "Warning:", "60 s fit a 4Gi dump")

	// A Job's pods are created by its controller, which gets their warnings: the user who applies
	// the Job gets the template's.
	out = s.applyManifest("job", graceWarnJob)
	t.Logf("kubectl apply of the Job printed:\n%s", out)
	assert.Contains(t, out, "Warning: stasis: pod template: terminationGracePeriodSeconds 5 leaves 2s")
	assert.Contains(t, out, "job.batch/short created")
}

const graceWarnJob = `apiVersion: batch/v1
kind: Job
metadata:
  name: short
spec:
  parallelism: 0
  template:
    metadata:
      labels:
        memverge.ai/checkpoint-mode: "true"
    spec:
      terminationGracePeriodSeconds: 5
      restartPolicy: Never
      containers:
      - name: app
        image: counter:integration
        command: ["/counter"]
        resources:
          limits:
            memory: 4Gi
`

const recreateDeployment = `apiVersion: apps/v1
kind: Deployment
metadata:
  name: counter
spec:
  replicas: 0
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 0
      maxUnavailable: 1
  selector:
    matchLabels: {app: counter}
  template:
    metadata:
      labels:
        app: counter
        memverge.ai/checkpoint-mode: "true"
    spec:
      containers:
      - name: app
        image: counter:integration
        command: ["/counter"]
`

// A checkpointed Deployment applied with a RollingUpdate strategy (even maxSurge 0, which does not
// wait for the old pod's dump): the webhook sets Recreate, kubectl prints why, and an update back
// to RollingUpdate is turned into Recreate again. An unlabelled Deployment is left alone.
func TestDeploymentStrategyRecreateThroughKubectl_NoKubelet(t *testing.T) {
	s := newScenario(t, "endings-deploy")
	out := s.applyManifest("deploy", recreateDeployment)
	t.Logf("kubectl apply printed:\n%s", out)
	assert.Contains(t, out, "Warning: stasis: spec.strategy set to Recreate (was RollingUpdate)")
	d, err := s.c.AppsV1().Deployments(s.ns).Get(s.ctx, "counter", metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, appsv1.DeploymentStrategy{Type: appsv1.RecreateDeploymentStrategyType}, d.Spec.Strategy)

	out, err = s.kubectl("-n", s.ns, "patch", "deployment/counter", "--type=merge", "-p", `{"spec":{"strategy":{"type":"RollingUpdate"}}}`)
	require.NoError(t, err, out)
	assert.Contains(t, out, "Warning: stasis: spec.strategy set to Recreate")
	d, err = s.c.AppsV1().Deployments(s.ns).Get(s.ctx, "counter", metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, appsv1.RecreateDeploymentStrategyType, d.Spec.Strategy.Type)

	assert.Equal(t, 2, s.reviews("deployment"), "one review per write of the labelled Deployment")

	plain := strings.NewReplacer("name: counter\n", "name: plain\n", `        memverge.ai/checkpoint-mode: "true"`+"\n", "").Replace(recreateDeployment)
	out = s.applyManifest("plain", plain)
	assert.NotContains(t, out, "Warning:")
	assert.Equal(t, 2, s.reviews("deployment"), "an unlabelled Deployment never reaches the webhook (matchConditions)")
	d, err = s.c.AppsV1().Deployments(s.ns).Get(s.ctx, "plain", metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, appsv1.RollingUpdateDeploymentStrategyType, d.Spec.Strategy.Type, "an unlabelled Deployment keeps its strategy")
}
