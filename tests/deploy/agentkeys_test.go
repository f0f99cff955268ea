//go:build integration

package deploy

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/stasis-k8s/stasis/checkpoint/namespacekeys"
)

// The agents' access to Secrets, as deploy/base grants it on a real API server: each namespace's
// checkpoint key is created on first use and read back, and the agents' identity can create no
// other Secret (the ValidatingAdmissionPolicy), read no other Secret and delete none (RBAC).
func TestAgentNamespaceKeys(t *testing.T) {
	tl := needTools(t)
	c := startCluster(t)
	kube := c.Client()
	tl.kubectlOK(t, c.Kubeconfig(), "apply", "-k", filepath.Join(tl.root, "deploy", "base"))
	ctx := context.Background()
	_, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "team-a"}}, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = kube.CoreV1().Secrets("team-a").Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "db-password"},
		Data: map[string][]byte{"password": []byte("hunter2")}}, metav1.CreateOptions{})
	require.NoError(t, err)

	cfg := c.RestConfig()
	cfg.Impersonate = rest.ImpersonationConfig{UserName: "system:serviceaccount:" + ns + ":stasis-agent",
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"}}
	agent, err := kubernetes.NewForConfig(cfg)
	require.NoError(t, err)

	// Anything but the key Secret is refused; the policy may take a moment to be enforced after
	// it is created, so wait until a forbidden create is refused.
	other := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "not-a-key"}, Type: namespacekeys.SecretType,
		Data: map[string][]byte{"current": []byte("a")}}
	eventually(t, time.Minute, "the admission policy refuses the agent's other Secrets", func() error {
		_, err := agent.CoreV1().Secrets("team-a").Create(ctx, other, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		if !apierrors.IsInvalid(err) && !apierrors.IsForbidden(err) {
			return fmt.Errorf("create of Secret not-a-key by the agent: %v", err)
		}
		return nil
	})
	tokenSteal := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: namespacekeys.SecretName,
		Annotations: map[string]string{corev1.ServiceAccountNameKey: "default"}}, Type: corev1.SecretTypeServiceAccountToken}
	_, err = agent.CoreV1().Secrets("team-a").Create(ctx, tokenSteal, metav1.CreateOptions{})
	require.Error(t, err, "the agent must not mint a service-account token Secret")
	assert.Contains(t, err.Error(), "may only create a namespace's checkpoint key")

	keys := namespacekeys.New(agent, time.Minute)
	id, kek, err := keys.Current("team-a")
	require.NoError(t, err, "the agent creates the namespace's key")
	assert.Len(t, kek, 32)
	again, err := namespacekeys.New(agent, time.Minute).ByID("team-a", id)
	require.NoError(t, err, "another agent reads it back")
	assert.Equal(t, kek, again)

	_, err = agent.CoreV1().Secrets("team-a").Get(ctx, "db-password", metav1.GetOptions{})
	assert.True(t, apierrors.IsForbidden(err), "the agent reads no other Secret: %v", err)
	_, err = agent.CoreV1().Secrets("team-a").List(ctx, metav1.ListOptions{})
	assert.True(t, apierrors.IsForbidden(err), "the agent lists no Secrets: %v", err)
	err = agent.CoreV1().Secrets("team-a").Delete(ctx, namespacekeys.SecretName, metav1.DeleteOptions{})
	assert.True(t, apierrors.IsForbidden(err), "the agent deletes no key: %v", err)
}
