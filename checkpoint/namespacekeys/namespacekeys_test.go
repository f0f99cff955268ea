package namespacekeys

// client-go's fake clientset stands in for the API server here (shape, caching, races between
// agents); tests/integration runs the same code against a real API server with the agents' RBAC
// and the admission policy.

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

func TestCreatedOnFirstUseThenReused(t *testing.T) {
	client := fake.NewClientset()
	s := New(client, time.Hour)
	id, kek, err := s.Current("team-a")
	require.NoError(t, err)
	assert.Len(t, kek, 32)
	sec, err := client.CoreV1().Secrets("team-a").Get(context.Background(), SecretName, metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, SecretType, sec.Type)
	assert.Equal(t, id, string(sec.Data[CurrentField]))

	// Another agent (its own cache) finds the same key.
	id2, kek2, err := New(client, time.Hour).Current("team-a")
	require.NoError(t, err)
	assert.Equal(t, id, id2)
	assert.Equal(t, kek, kek2)
	got, err := New(client, time.Hour).ByID("team-a", id)
	require.NoError(t, err)
	assert.Equal(t, kek, got)

	// Namespaces have their own keys.
	_, other, err := s.Current("team-b")
	require.NoError(t, err)
	assert.NotEqual(t, kek, other)
}

func TestRotationAndShredding(t *testing.T) {
	client := fake.NewClientset()
	s := New(client, time.Hour)
	oldID, oldKEK, err := s.Current("ns")
	require.NoError(t, err)
	ctx := context.Background()
	sec, err := client.CoreV1().Secrets("ns").Get(ctx, SecretName, metav1.GetOptions{})
	require.NoError(t, err)
	sec.Data[KeyPrefix+"k2"] = make([]byte, 32)
	sec.Data[CurrentField] = []byte("k2")
	_, err = client.CoreV1().Secrets("ns").Update(ctx, sec, metav1.UpdateOptions{})
	require.NoError(t, err)

	// The cached copy serves until TTL; an unknown id is looked up live at once.
	got, err := s.ByID("ns", "k2")
	require.NoError(t, err)
	assert.Len(t, got, 32)
	s.Forget("ns")
	id, _, err := s.Current("ns")
	require.NoError(t, err)
	assert.Equal(t, "k2", id, "new checkpoints use the rotated key")
	got, err = s.ByID("ns", oldID)
	require.NoError(t, err)
	assert.Equal(t, oldKEK, got, "older checkpoints still unwrap while their key is kept")

	// Deleting the Secret shreds the namespace's checkpoints: no key unwraps, and a later dump
	// starts a new key (the old checkpoints stay unreadable).
	require.NoError(t, client.CoreV1().Secrets("ns").Delete(ctx, SecretName, metav1.DeleteOptions{}))
	s.Forget("ns")
	_, err = s.ByID("ns", oldID)
	assert.ErrorContains(t, err, "checkpoints cannot be decrypted")
	newID, _, err := s.Current("ns")
	require.NoError(t, err)
	assert.NotEqual(t, oldID, newID)
	_, err = s.ByID("ns", oldID)
	assert.ErrorContains(t, err, "rotated out or replaced")
}

func TestMalformedSecretsNameTheField(t *testing.T) {
	for name, tc := range map[string]struct {
		typ  corev1.SecretType
		data map[string][]byte
		want string
	}{
		"type":          {corev1.SecretTypeOpaque, map[string][]byte{CurrentField: []byte("a"), "key-a": make([]byte, 32)}, `type "Opaque"`},
		"no current":    {SecretType, map[string][]byte{"key-a": make([]byte, 32)}, `field "current" is missing`},
		"dangling":      {SecretType, map[string][]byte{CurrentField: []byte("b"), "key-a": make([]byte, 32)}, `no field key-b`},
		"short key":     {SecretType, map[string][]byte{CurrentField: []byte("a"), "key-a": make([]byte, 16)}, `field "key-a": 16 bytes`},
		"foreign field": {SecretType, map[string][]byte{CurrentField: []byte("a"), "key-a": make([]byte, 32), "token": nil}, `field "token"`},
		"bad id":        {SecretType, map[string][]byte{CurrentField: []byte("A"), "key-A": make([]byte, 32)}, `field "key-A"`},
	} {
		t.Run(name, func(t *testing.T) {
			client := fake.NewClientset(&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: SecretName, Namespace: "ns"}, Type: tc.typ, Data: tc.data})
			_, _, err := New(client, time.Hour).Current("ns")
			assert.ErrorContains(t, err, tc.want)
		})
	}
}

// An agent cut off from the API server (a partitioned node dumping on SIGTERM) goes on with the
// copy it read before; a Secret seen deleted is never served from that copy.
func TestStaleCopyServesWhenTheAPIIsUnreachable(t *testing.T) {
	client := fake.NewClientset()
	s := New(client, time.Nanosecond) // every use reads again
	id, kek, err := s.Current("ns")
	require.NoError(t, err)
	client.PrependReactor("get", "secrets", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, errors.New("dial tcp 10.0.0.1:443: connect: no route to host")
	})
	id2, kek2, err := s.Current("ns")
	require.NoError(t, err, "the cached copy wraps")
	assert.Equal(t, id, id2)
	assert.Equal(t, kek, kek2)
	_, _, err = New(client, time.Minute).Current("ns")
	assert.ErrorContains(t, err, "no route to host", "an agent with no copy fails the dump")
}
