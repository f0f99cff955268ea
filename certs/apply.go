package certs

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

const (
	// InjectAnnotation marks the webhook configurations whose caBundle comes from the webhook's
	// certificate; cert-manager's CA injector reads the same annotation, so one set of manifests
	// serves both install paths.
	InjectAnnotation = "cert-manager.io/inject-ca-from"
	// CASecret keeps the CA in the cluster when --apply runs without --out-dir (the name
	// cert-manager's CA Certificate uses too).
	CASecret = "stasis-ca"
)

type cluster struct {
	kube kubernetes.Interface
}

func newCluster(kubeconfig string) (*cluster, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if kubeconfig != "" {
		rules.ExplicitPath = kubeconfig
	}
	rc, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("--apply: no cluster access: %w", err)
	}
	kube, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	return &cluster{kube: kube}, nil
}

// ApplyToCluster is Make's --apply path on an existing client (tests use the same code).
func ApplyToCluster(ctx context.Context, kube kubernetes.Interface, namespace, service string, b Bundle) (int, error) {
	cl := &cluster{kube: kube}
	if err := cl.applySecrets(ctx, namespace, b.Secrets); err != nil {
		return 0, err
	}
	return cl.injectCABundle(ctx, namespace+"/"+service, b.CABundle())
}

func (c *cluster) readCA(ctx context.Context, namespace string) (Pair, bool, error) {
	s, err := c.kube.CoreV1().Secrets(namespace).Get(ctx, CASecret, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return Pair{}, false, nil
	}
	if err != nil {
		return Pair{}, false, fmt.Errorf("reading Secret %s/%s: %w", namespace, CASecret, err)
	}
	ca := Pair{CertPEM: s.Data[KeyCert], KeyPEM: s.Data[KeyKey]}
	if _, _, err := parseCA(ca); err != nil {
		return Pair{}, false, fmt.Errorf("Secret %s/%s: %w (use --new-ca to replace it)", namespace, CASecret, err)
	}
	return ca, true, nil
}

func (c *cluster) writeCA(ctx context.Context, namespace string, ca Pair) error {
	return c.upsert(ctx, namespace, Secret{Name: CASecret, Data: map[string][]byte{
		KeyCert: ca.CertPEM, KeyKey: ca.KeyPEM, KeyCA: ca.CertPEM,
	}})
}

func (c *cluster) applySecrets(ctx context.Context, namespace string, secrets []Secret) error {
	for _, s := range secrets {
		if err := c.upsert(ctx, namespace, s); err != nil {
			return err
		}
	}
	return nil
}

func (c *cluster) upsert(ctx context.Context, namespace string, s Secret) error {
	want := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: s.Name, Namespace: namespace, Labels: map[string]string{
			"app.kubernetes.io/part-of":    "stasis",
			"app.kubernetes.io/managed-by": "stasis-certs",
		}},
		Type: corev1.SecretTypeTLS,
		Data: s.Data,
	}
	api := c.kube.CoreV1().Secrets(namespace)
	cur, err := api.Get(ctx, s.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		if _, err := api.Create(ctx, want, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating Secret %s/%s: %w", namespace, s.Name, err)
		}
		return nil
	case err != nil:
		return fmt.Errorf("reading Secret %s/%s: %w", namespace, s.Name, err)
	}
	if cur.Type != corev1.SecretTypeTLS {
		return fmt.Errorf("Secret %s/%s has type %q, not %q: delete it first", namespace, s.Name, cur.Type, corev1.SecretTypeTLS)
	}
	cur.Data = s.Data
	if cur.Labels == nil {
		cur.Labels = map[string]string{}
	}
	for k, v := range want.Labels {
		cur.Labels[k] = v
	}
	if _, err := api.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("updating Secret %s/%s: %w", namespace, s.Name, err)
	}
	return nil
}

// injectCABundle does what cert-manager's CA injector does: every Validating/Mutating webhook
// configuration annotated InjectAnnotation=from gets caBundle in each of its webhooks.
// It returns how many configurations it updated.
func (c *cluster) injectCABundle(ctx context.Context, from string, caBundle []byte) (int, error) {
	n := 0
	adm := c.kube.AdmissionregistrationV1()
	vl, err := adm.ValidatingWebhookConfigurations().List(ctx, metav1.ListOptions{})
	if err != nil {
		return 0, fmt.Errorf("listing ValidatingWebhookConfigurations: %w", err)
	}
	for i := range vl.Items {
		v := &vl.Items[i]
		if v.Annotations[InjectAnnotation] != from {
			continue
		}
		for j := range v.Webhooks {
			v.Webhooks[j].ClientConfig.CABundle = caBundle
		}
		if _, err := adm.ValidatingWebhookConfigurations().Update(ctx, v, metav1.UpdateOptions{}); err != nil {
			return n, fmt.Errorf("ValidatingWebhookConfiguration %s: %w", v.Name, err)
		}
		n++
	}
	ml, err := adm.MutatingWebhookConfigurations().List(ctx, metav1.ListOptions{})
	if err != nil {
		return n, fmt.Errorf("listing MutatingWebhookConfigurations: %w", err)
	}
	for i := range ml.Items {
		m := &ml.Items[i]
		if m.Annotations[InjectAnnotation] != from {
			continue
		}
		for j := range m.Webhooks {
			m.Webhooks[j].ClientConfig.CABundle = caBundle
		}
		if _, err := adm.MutatingWebhookConfigurations().Update(ctx, m, metav1.UpdateOptions{}); err != nil {
			return n, fmt.Errorf("MutatingWebhookConfiguration %s: %w", m.Name, err)
		}
		n++
	}
	return n, nil
}
