package webhook

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	corev1 "k8s.io/api/core/v1"
)

// The patch carries only the fields the webhook changed, whole, and leaves the rest of the
// request as sent, including fields this build's API types do not know.
func TestPodPatchTouchesOnlyChangedFields(t *testing.T) {
	raw := []byte(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","labels":{"a":"b"}},` +
		`"spec":{"futureField":{"x":1},"containers":[{"name":"app","image":"app:1","futureContainerField":true}],"volumes":[{"name":"gone","emptyDir":{}}]}}`)
	var before corev1.Pod
	require.NoError(t, json.Unmarshal(raw, &before))
	after := before.DeepCopy()
	after.Annotations = map[string]string{"stasis.dev/wired": "true"}
	after.Spec.InitContainers = []corev1.Container{{Name: "stasis-tools", Image: "tools"}}
	after.Spec.Volumes = nil

	patch, err := podPatch(&before, after)
	require.NoError(t, err)
	var ops []patchOp
	require.NoError(t, json.Unmarshal(patch, &ops))
	var paths []string
	for _, o := range ops {
		paths = append(paths, o.Op+" "+o.Path)
	}
	assert.ElementsMatch(t, []string{"add /metadata/annotations", "remove /spec/volumes", "add /spec/initContainers"}, paths)

	p, err := jsonpatch.DecodePatch(patch)
	require.NoError(t, err)
	patched, err := p.Apply(raw)
	require.NoError(t, err)
	var got map[string]any
	require.NoError(t, json.Unmarshal(patched, &got))
	spec := got["spec"].(map[string]any)
	assert.Equal(t, map[string]any{"x": 1.0}, spec["futureField"], "a field unknown to the API types stays")
	assert.Equal(t, true, spec["containers"].([]any)[0].(map[string]any)["futureContainerField"], "an unchanged field is not re-encoded")
	assert.NotContains(t, got, "status")

	none, err := podPatch(&before, before.DeepCopy())
	require.NoError(t, err)
	assert.Nil(t, none, "nothing changed: no patch (a reinvocation that finds Stasis' own pod)")
}
