//go:build integration

package integration

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/stasis-k8s/stasis/tests/cluster"
	"github.com/stasis-k8s/stasis/wiring"
)

// plainPodExample reads docs/examples/plain-pod.yaml, a verbatim copy of the plain-pod example of the
// documentation Stasis is compatible with (../shared/examples/plain-pod.yaml), and fills in what
// the example leaves to the user: the storage class and, since there is no scheduler decision to
// make here, the node.
func plainPodExample(t *testing.T, node string) (*corev1.PersistentVolumeClaim, *corev1.Pod) {
	t.Helper()
	root, err := cluster.RepoRoot()
	require.NoError(t, err)
	data, err := os.ReadFile(root + "/docs/examples/plain-pod.yaml")
	require.NoError(t, err)
	var pvc *corev1.PersistentVolumeClaim
	var pod *corev1.Pod
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		var meta metav1.TypeMeta
		require.NoError(t, yaml.Unmarshal(doc, &meta))
		switch meta.Kind {
		case "PersistentVolumeClaim":
			pvc = &corev1.PersistentVolumeClaim{}
			require.NoError(t, yaml.UnmarshalStrict(doc, pvc))
		case "Pod":
			pod = &corev1.Pod{}
			require.NoError(t, yaml.UnmarshalStrict(doc, pod))
		}
	}
	require.NotNil(t, pvc, "testdata/plain-pod.yaml has a PersistentVolumeClaim")
	require.NotNil(t, pod, "testdata/plain-pod.yaml has a Pod")
	sc := "integration-none"
	pvc.Spec.StorageClassName = &sc
	pod.Spec.NodeName = node
	return pvc, pod
}

// Scenario 4: the plain-pod example (user PVC named in memverge.ai/checkpoint-storage-volume, no
// command: entrypoint from the image) is evicted, then re-created by the user with the same name:
// the new pod gets the restore. A plain pod naming a volume it lacks is refused with a clear message.
func TestPlainPodExampleEvictedThenRecreatedRestores_NoKubelet(t *testing.T) {
	s := newScenario(t, "s4-plain", "a", "b")
	pvc, pod := plainPodExample(t, s.nodes[0])
	_, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).Create(s.ctx, pvc, metav1.CreateOptions{})
	require.NoError(t, err)
	first, err := s.c.CoreV1().Pods(s.ns).Create(s.ctx, pod.DeepCopy(), metav1.CreateOptions{})
	require.NoError(t, err)
	assert.Equal(t, "true", first.Annotations[wiring.AnnotationWired])
	assert.Empty(t, first.Annotations[wiring.AnnotationRestore])
	require.NotEmpty(t, first.Spec.Containers[0].Command)
	assert.True(t, wiring.Wrapped(first.Spec.Containers[0].Command), "the container runs under the launcher")
	assert.Contains(t, first.Spec.Containers[0].Command, wiring.FlagEntrypointFromImage, "no command in the example: the launcher takes the image's entrypoint")
	s.waitRunning(pod.Name)

	// Evicted like kubectl drain evicts (retrying 429s); the default fake dump fits the budget.
	for {
		err = s.evict(pod.Name, false)
		if err == nil {
			break
		}
		require.True(t, apierrors.IsTooManyRequests(err), "eviction: %v", err)
		time.Sleep(time.Second)
	}
	s.waitGone(pod.Name, string(first.UID))
	assert.Equal(t, 1, env.agent.DumpsOf(s.ns, pod.Name))
	assert.Equal(t, 1, s.pvcRecords(pvc.Name), "the checkpoint is recorded on the user's PVC")

	// The user re-creates the pod with the same name, on another node.
	again := pod.DeepCopy()
	again.Spec.NodeName = s.nodes[1]
	second, err := s.c.CoreV1().Pods(s.ns).Create(s.ctx, again, metav1.CreateOptions{})
	require.NoError(t, err)
	raw := second.Annotations[wiring.AnnotationRestore]
	require.NotEmpty(t, raw, "the re-created pod restores")
	var ref wiring.RestoreRef
	require.NoError(t, json.Unmarshal([]byte(raw), &ref))
	assert.NotEmpty(t, ref.ID)
	assert.NotEmpty(t, ref.Containers, "the containers that restore together")
	assert.True(t, hasEnv(*second, wiring.EnvRestoreID), "the launcher asks the agent to restore")
	s.waitEvent("Pod", pod.Name, "restoring")
	s.waitRunning(pod.Name)

	// A plain pod that names a volume it does not have is refused, naming the label and the volume.
	bad := pod.DeepCopy()
	bad.Name = "no-such-volume"
	bad.Labels[storageLabel] = "missing"
	_, err = s.c.CoreV1().Pods(s.ns).Create(s.ctx, bad, metav1.CreateOptions{})
	require.Error(t, err)
	assert.Contains(t, err.Error(), storageLabel)
	assert.Contains(t, err.Error(), `"missing"`)
	t.Logf("refusal: %v", err)

	// A plain pod without the storage label cannot get a Stasis-made PVC (no controller owns it).
	bare := pod.DeepCopy()
	bare.Name = "no-storage-label"
	delete(bare.Labels, storageLabel)
	_, err = s.c.CoreV1().Pods(s.ns).Create(s.ctx, bare, metav1.CreateOptions{})
	require.Error(t, err)
	assert.Contains(t, err.Error(), storageLabel)
	t.Logf("refusal: %v", err)
}
