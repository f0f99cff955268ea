//go:build integration

package deploy

import (
	"context"
	"crypto/x509"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/certs"
	"github.com/stasis-k8s/stasis/tests/cluster"
	"github.com/stasis-k8s/stasis/wiring"
)

var tlsSecrets = []string{certs.WebhookSecret, certs.AgentSecret, certs.AgentClientSecret}

func typed(t *testing.T, u map[string]any, into any) {
	t.Helper()
	require.NoError(t, runtime.DefaultUnstructuredConverter.FromUnstructured(u, into))
}

func envOf(c corev1.Container) map[string]corev1.EnvVar {
	m := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		m[e.Name] = e
	}
	return m
}

// The base builds, holds every object of the install, and its settings are the ones the issue asks
// for; every STASIS_* variable the manifests set is a flag the binary knows.
func TestKustomizeBuild(t *testing.T) {
	tl := needTools(t)
	out := tl.kubectlOK(t, "", "kustomize", filepath.Join(tl.root, "deploy"))
	objs := decodeObjects(t, out)

	for _, want := range []struct{ kind, name string }{
		{"Namespace", ns},
		{"ServiceAccount", "stasis-webhook"}, {"ClusterRole", "stasis-webhook"}, {"ClusterRoleBinding", "stasis-webhook"},
		{"Deployment", "stasis-webhook"}, {"Service", "stasis-webhook"}, {"PodDisruptionBudget", "stasis-webhook"},
		{"ServiceAccount", "stasis-agent"}, {"ClusterRole", "stasis-agent"}, {"DaemonSet", "stasis-agent"}, {"NetworkPolicy", "stasis-agent"},
		{"ValidatingWebhookConfiguration", "stasis"}, {"MutatingWebhookConfiguration", "stasis"},
		{"Issuer", "stasis-selfsigned"}, {"Certificate", "stasis-ca"}, {"Issuer", "stasis-ca"},
		{"Certificate", "stasis-webhook"}, {"Certificate", "stasis-agent"}, {"Certificate", "stasis-agent-client"},
	} {
		o := find(objs, want.kind, want.name)
		if !assert.NotNil(t, o, "%s %s missing from deploy/", want.kind, want.name) {
			continue
		}
		if want.kind != "Namespace" && !strings.HasPrefix(want.kind, "Cluster") && !strings.Contains(want.kind, "WebhookConfiguration") {
			assert.Equal(t, ns, o.GetNamespace(), "%s %s", want.kind, want.name)
		}
	}
	refs := map[string]string{}
	for _, im := range []string{"stasis-webhook", "stasis-agent"} {
		// Image names are set in one place: deploy/base/kustomization.yaml.
		data, err := os.ReadFile(filepath.Join(tl.root, "deploy/base/kustomization.yaml"))
		require.NoError(t, err)
		m := regexp.MustCompile(`(?m)^- name: ` + im + `\n  newName: (\S+)\n  newTag: (\S+)`).FindStringSubmatch(string(data))
		require.Len(t, m, 3, "images: entry for %s", im)
		refs[im] = m[1] + ":" + m[2]
	}

	var dep appsv1.Deployment
	typed(t, find(objs, "Deployment", "stasis-webhook").Object, &dep)
	assert.EqualValues(t, 2, *dep.Spec.Replicas)
	require.NotNil(t, dep.Spec.Template.Spec.Affinity)
	assert.NotNil(t, dep.Spec.Template.Spec.Affinity.PodAntiAffinity)
	wc := dep.Spec.Template.Spec.Containers[0]
	assert.Equal(t, refs["stasis-webhook"], wc.Image)
	assert.True(t, *dep.Spec.Template.Spec.SecurityContext.RunAsNonRoot)
	assert.True(t, *wc.SecurityContext.ReadOnlyRootFilesystem)
	assert.False(t, *wc.SecurityContext.AllowPrivilegeEscalation)
	assert.Equal(t, "/readyz", wc.ReadinessProbe.HTTPGet.Path)
	assert.Equal(t, "/healthz", wc.LivenessProbe.HTTPGet.Path)
	assert.False(t, wc.Resources.Requests.Cpu().IsZero())
	assert.False(t, wc.Resources.Requests.Memory().IsZero())
	wenv := envOf(wc)
	// The tools init-container's image follows the agent image wherever `images:` sets it.
	assert.Equal(t, refs["stasis-agent"], wenv["STASIS_TOOLS_IMAGE"].Value)

	var ds appsv1.DaemonSet
	typed(t, find(objs, "DaemonSet", "stasis-agent").Object, &ds)
	ps := ds.Spec.Template.Spec
	assert.True(t, ps.HostPID)
	assert.Equal(t, "stasis-agent", ds.Spec.Template.Labels["app.kubernetes.io/name"])
	require.Len(t, ps.Tolerations, 1)
	assert.Equal(t, corev1.TolerationOpExists, ps.Tolerations[0].Operator)
	assert.Empty(t, ps.Tolerations[0].Key, "the agent must tolerate every taint")
	ac := ps.Containers[0]
	assert.Equal(t, refs["stasis-agent"], ac.Image)
	assert.True(t, *ac.SecurityContext.Privileged)
	aenv := envOf(ac)
	require.NotNil(t, aenv["NODE_NAME"].ValueFrom)
	assert.Equal(t, "spec.nodeName", aenv["NODE_NAME"].ValueFrom.FieldRef.FieldPath)
	hostPaths := map[string]bool{}
	for _, v := range ps.Volumes {
		if v.HostPath != nil {
			hostPaths[v.HostPath.Path] = true
		}
	}
	assert.Equal(t, map[string]bool{"/run/containerd": true, wiring.HostAgentDir: true}, hostPaths, "the agent's host paths")

	// Every webhook configuration is injected by cert-manager from the webhook's Certificate.
	for _, kind := range []string{"ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"} {
		for _, o := range objs {
			if o.GetKind() == kind {
				assert.Equal(t, ns+"/stasis-webhook", o.GetAnnotations()[certs.InjectAnnotation], "%s %s", kind, o.GetName())
			}
		}
	}

	// The variables the manifests set are flags of the binary (flagenv lists $STASIS_<FLAG> in --help).
	for cmd, c := range map[string]corev1.Container{"webhook": wc, "agent": ac} {
		help, _ := exec.Command(tl.stasis, cmd, "--help").CombinedOutput()
		for name := range envOf(c) {
			if strings.HasPrefix(name, "STASIS_") {
				assert.Contains(t, string(help), "$"+name+"]", "deploy/ sets %s on the %s, but `stasis %s` has no such flag", name, cmd, cmd)
			}
		}
	}
}

// The no-cert-manager path: `stasis certs` → overlay → server-side dry-run and apply; the caBundle is
// the CA; the real webhook serves with the Secret files, the API server calls it through the
// Service, and a renewed certificate is picked up without a restart.
func TestNoCertManagerOverlay(t *testing.T) {
	tl := needTools(t)
	dir := copyDeploy(t, tl.root)
	overlay := filepath.Join(dir, "overlays", "no-cert-manager")
	tlsDir := filepath.Join(overlay, "tls")
	out, err := exec.Command(tl.stasis, "certs", "--out-dir", tlsDir).CombinedOutput()
	require.NoError(t, err, "stasis certs: %s", out)
	caPEM, err := os.ReadFile(filepath.Join(tlsDir, "ca.crt"))
	require.NoError(t, err)

	objs := decodeObjects(t, tl.kubectlOK(t, "", "kustomize", overlay))
	for _, o := range objs {
		assert.NotEqual(t, "cert-manager.io/v1", o.GetAPIVersion(), "the overlay must not need cert-manager: %s %s", o.GetKind(), o.GetName())
	}
	for _, name := range tlsSecrets {
		if s := find(objs, "Secret", name); assert.NotNil(t, s, "Secret %s", name) {
			assert.Equal(t, ns, s.GetNamespace(), "Secret %s", name)
		}
	}

	c := startCluster(t)
	kube := c.Client()
	kc := c.Kubeconfig()
	// Server-side dry-run of namespaced objects needs their namespace to exist.
	tl.kubectlOK(t, kc, "apply", "-f", filepath.Join(dir, "base", "namespace.yaml"))
	tl.kubectlOK(t, kc, "apply", "-k", overlay, "--dry-run=server")
	tl.kubectlOK(t, kc, "apply", "-k", overlay)
	assertInstalled(t, kube)

	for _, name := range tlsSecrets {
		data := getSecret(t, kube, name)
		for _, k := range []string{"tls.crt", "tls.key", "ca.crt"} {
			want, err := os.ReadFile(filepath.Join(tlsDir, name, k))
			require.NoError(t, err)
			assert.Equal(t, want, data[k], "Secret %s key %s", name, k)
		}
	}
	assertCABundle(t, kube, caPEM)

	serving, client := newSecretFiles(t), newSecretFiles(t)
	serving.write(t, getSecret(t, kube, certs.WebhookSecret))
	client.write(t, getSecret(t, kube, certs.AgentClientSecret))
	checkWebhookThroughAPIServer(t, tl, c, "stasisdpl0", "10.253.77.1", serving, client, func() {
		// Renewal as documented: rerun `stasis certs` with the same directory, apply again.
		out, err := exec.Command(tl.stasis, "certs", "--out-dir", tlsDir).CombinedOutput()
		require.NoError(t, err, "stasis certs: %s", out)
		tl.kubectlOK(t, kc, "apply", "-k", overlay)
	})
	// The CA did not change, so the caBundle applied first still holds.
	assertCABundle(t, kube, caPEM)
}

// The cert-manager path, with cert-manager's own controllers and CA injector
// (hack/cert-manager/build.sh): CRDs from the cert-manager module, dry-run and apply of deploy/,
// Certificates Ready, Secrets issued, caBundle injected, then the API server calls the webhook
// with that TLS, and a renewal reaches the webhook without a restart.
func TestCertManager(t *testing.T) {
	tl := needTools(t)
	cmd := exec.Command(filepath.Join(tl.root, "hack/cert-manager/build.sh"))
	cmd.Stderr = os.Stderr
	cmOut, err := cmd.Output()
	require.NoError(t, err, "hack/cert-manager/build.sh")
	cmDir := strings.TrimSpace(string(cmOut))

	c := startCluster(t)
	kube := c.Client()
	kc := c.Kubeconfig()
	tl.kubectlOK(t, kc, "apply", "--server-side", "-f", filepath.Join(cmDir, "crds"))
	tl.kubectlOK(t, kc, "wait", "--for=condition=Established", "--timeout=120s", "crd", "--all")

	deployDir := filepath.Join(tl.root, "deploy")
	tl.kubectlOK(t, kc, "apply", "-f", filepath.Join(deployDir, "base", "namespace.yaml"))
	tl.kubectlOK(t, kc, "apply", "-k", deployDir, "--dry-run=server")
	tl.kubectlOK(t, kc, "apply", "-k", deployDir)
	assertInstalled(t, kube)

	for _, role := range []string{"controller", "cainjector"} {
		startCertManager(t, filepath.Join(cmDir, "bin", "cert-manager-lite"), role, kc)
	}
	tl.kubectlOK(t, kc, "wait", "-n", ns, "--for=condition=Ready", "--timeout=180s",
		"certificate/stasis-ca", "certificate/stasis-webhook", "certificate/stasis-agent", "certificate/stasis-agent-client")

	ca := getSecret(t, kube, "stasis-ca")
	caPEM := ca["tls.crt"]
	roots := pool(t, caPEM)
	for _, tc := range []struct {
		secret string
		name   string
		usage  x509.ExtKeyUsage
	}{
		{certs.WebhookSecret, "stasis-webhook.stasis-system.svc", x509.ExtKeyUsageServerAuth},
		{certs.AgentSecret, agentapi.ServerName, x509.ExtKeyUsageServerAuth},
		{certs.AgentClientSecret, agentapi.WebhookIdentity, x509.ExtKeyUsageClientAuth},
	} {
		data := getSecret(t, kube, tc.secret)
		assert.Equal(t, caPEM, data["ca.crt"], "%s: ca.crt is the Stasis CA", tc.secret)
		leaf := leafOf(t, data)
		_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: tc.name, KeyUsages: []x509.ExtKeyUsage{tc.usage}})
		assert.NoError(t, err, "%s", tc.secret)
	}
	assert.Equal(t, agentapi.WebhookIdentity, leafOf(t, getSecret(t, kube, certs.AgentClientSecret)).Subject.CommonName)

	eventually(t, 2*time.Minute, "caBundle injected by cert-manager's cainjector", func() error {
		return caBundleIs(kube, caPEM)
	})
	// Re-applying the manifests (an upgrade) must not wipe the injected caBundle: the manifests'
	// empty caBundle is unchanged since the last apply, so kubectl leaves the server's value alone.
	out := tl.kubectlOK(t, kc, "apply", "-k", deployDir)
	assert.Contains(t, out, "validatingwebhookconfiguration.admissionregistration.k8s.io/stasis unchanged")
	assertCABundle(t, kube, caPEM)

	serving, client := newSecretFiles(t), newSecretFiles(t)
	serving.write(t, getSecret(t, kube, certs.WebhookSecret))
	client.write(t, getSecret(t, kube, certs.AgentClientSecret))
	old := leafOf(t, getSecret(t, kube, certs.WebhookSecret)).SerialNumber
	checkWebhookThroughAPIServer(t, tl, c, "stasisdpl1", "10.253.78.1", serving, client, func() {
		// A renewal the way cert-manager does it on schedule: re-issue into the same Secret.
		tl.kubectlOK(t, kc, "delete", "secret", "-n", ns, certs.WebhookSecret)
		eventually(t, 2*time.Minute, "cert-manager re-issues "+certs.WebhookSecret, func() error {
			s, err := kube.CoreV1().Secrets(ns).Get(context.Background(), certs.WebhookSecret, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if len(s.Data["tls.crt"]) == 0 {
				return errf("no tls.crt yet")
			}
			if leafOf(t, s.Data).SerialNumber.Cmp(old) == 0 {
				return errf("still the old certificate")
			}
			return nil
		})
	})
	assertCABundle(t, kube, caPEM)
}

// checkWebhookThroughAPIServer: with the webhook down an eviction is refused (the configuration
// really routes to it, fail-closed); with the real webhook serving the Secret files behind the
// Service, evictions pass (the API server verified the webhook with the injected caBundle); after
// renew() has rotated the serving Secret, the webhook serves the new certificate without a restart
// and the API server still trusts it.
func checkWebhookThroughAPIServer(t *testing.T, tl tools, c *cluster.Cluster, link, ip string, serving, client *secretFiles, renew func()) {
	t.Helper()
	kube := c.Client()
	createNamespace(t, kube, "deploy-test")
	network := newTestNetwork(t, link, ip)

	err := evictPlainPod(kube, "deploy-test", "before")
	require.Error(t, err, "an eviction must not pass while the webhook is down (failurePolicy Fail)")
	t.Logf("webhook down, as expected: %v", err)

	w := startWebhook(t, tl, c, network, serving, client)
	routeService(t, kube, w.addr)
	eventually(t, time.Minute, "eviction through the webhook Service", func() error {
		return evictPlainPod(kube, "deploy-test", "first")
	})

	checkWiredPod(t, kube)

	svcName := "stasis-webhook.stasis-system.svc"
	roots := pool(t, getSecret(t, kube, certs.WebhookSecret)["ca.crt"])
	before, err := servedCert(w.addr, svcName, roots, nil)
	require.NoError(t, err)

	renew()
	renewed := getSecret(t, kube, certs.WebhookSecret)
	want := leafOf(t, renewed).SerialNumber
	require.NotEqual(t, 0, want.Cmp(before.SerialNumber), "the renewal must issue a new certificate")
	serving.write(t, renewed) // what the kubelet does to the pod's secret volume
	eventually(t, time.Minute, "the webhook serves the renewed certificate", func() error {
		got, err := servedCert(w.addr, svcName, roots, nil)
		if err != nil {
			return err
		}
		if got.SerialNumber.Cmp(want) != 0 {
			return errf("serial %s, want %s", got.SerialNumber, want)
		}
		return nil
	})
	select {
	case <-w.exited:
		t.Fatalf("the webhook exited during the renewal: %v", w.err)
	default:
	}
	require.NoError(t, evictPlainPod(kube, "deploy-test", "after-renewal"))
}

func assertInstalled(t *testing.T, kube kubernetes.Interface) {
	t.Helper()
	ctx := context.Background()
	_, err := kube.AppsV1().Deployments(ns).Get(ctx, "stasis-webhook", metav1.GetOptions{})
	assert.NoError(t, err)
	_, err = kube.AppsV1().DaemonSets(ns).Get(ctx, "stasis-agent", metav1.GetOptions{})
	assert.NoError(t, err)
	_, err = kube.CoreV1().Services(ns).Get(ctx, "stasis-webhook", metav1.GetOptions{})
	assert.NoError(t, err)
	_, err = kube.PolicyV1().PodDisruptionBudgets(ns).Get(ctx, "stasis-webhook", metav1.GetOptions{})
	assert.NoError(t, err)
	_, err = kube.AdmissionregistrationV1().ValidatingWebhookConfigurations().Get(ctx, "stasis", metav1.GetOptions{})
	assert.NoError(t, err)
	_, err = kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, "stasis", metav1.GetOptions{})
	assert.NoError(t, err)
	// The pod template is admitted too (Pod Security "privileged" namespace, priority class): the
	// ReplicaSet controller creates both replicas (they stay Pending: no kubelet in this tier).
	eventually(t, time.Minute, "2 stasis-webhook pods created", func() error {
		pods, err := kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=stasis-webhook"})
		if err != nil {
			return err
		}
		if len(pods.Items) != 2 {
			return errf("%d pods", len(pods.Items))
		}
		return nil
	})
	// And the agent's (privileged, hostPID, host paths): a Node object is enough for the DaemonSet
	// controller to create its pod.
	_, err = kube.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "deploy-test-node",
		Labels: map[string]string{"kubernetes.io/hostname": "deploy-test-node"}}}, metav1.CreateOptions{})
	require.NoError(t, err)
	eventually(t, time.Minute, "the stasis-agent pod created for the node", func() error {
		pods, err := kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=stasis-agent"})
		if err != nil {
			return err
		}
		if len(pods.Items) != 1 {
			ds, _ := kube.AppsV1().DaemonSets(ns).Get(ctx, "stasis-agent", metav1.GetOptions{})
			return errf("%d pods; DaemonSet status %+v", len(pods.Items), ds.Status)
		}
		return nil
	})
}

func assertCABundle(t *testing.T, kube kubernetes.Interface, caPEM []byte) {
	t.Helper()
	assert.NoError(t, caBundleIs(kube, caPEM))
}

// caBundleIs checks every webhook of every Stasis webhook configuration.
func caBundleIs(kube kubernetes.Interface, caPEM []byte) error {
	ctx := context.Background()
	v, err := kube.AdmissionregistrationV1().ValidatingWebhookConfigurations().Get(ctx, "stasis", metav1.GetOptions{})
	if err != nil {
		return err
	}
	m, err := kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, "stasis", metav1.GetOptions{})
	if err != nil {
		return err
	}
	check := func(kind, name string, cc admissionv1.WebhookClientConfig) error {
		if string(cc.CABundle) != string(caPEM) {
			return errf("%s %s: caBundle is not the Stasis CA (%d bytes)", kind, name, len(cc.CABundle))
		}
		return nil
	}
	for _, w := range v.Webhooks {
		if err := check("validating webhook", w.Name, w.ClientConfig); err != nil {
			return err
		}
	}
	for _, w := range m.Webhooks {
		if err := check("mutating webhook", w.Name, w.ClientConfig); err != nil {
			return err
		}
	}
	if len(v.Webhooks) == 0 || len(m.Webhooks) == 0 {
		return errf("no webhooks")
	}
	return nil
}

func startCertManager(t *testing.T, bin, role, kubeconfig string) {
	t.Helper()
	startProcess(t, "cert-manager-"+role, exec.Command(bin, role, "--kubeconfig", kubeconfig))
}

// `stasis certs --apply`: the Secrets go straight into the cluster, the CA is kept in the Secret
// stasis-ca, every annotated webhook configuration gets the caBundle, and a rerun renews the leaves
// with the same CA.
func TestCertsApply(t *testing.T) {
	tl := needTools(t)
	c := startCluster(t)
	kube := c.Client()
	kc := c.Kubeconfig()
	tl.kubectlOK(t, kc, "apply", "-k", filepath.Join(tl.root, "deploy", "base"))

	run := func() {
		out, err := exec.Command(tl.stasis, "certs", "--apply", "--kubeconfig", kc).CombinedOutput()
		require.NoError(t, err, "stasis certs --apply: %s", out)
	}
	run()
	ca := getSecret(t, kube, certs.CASecret)
	require.NoError(t, caBundleIs(kube, ca["tls.crt"]))
	first := map[string][]byte{}
	for _, name := range tlsSecrets {
		data := getSecret(t, kube, name)
		assert.Equal(t, ca["tls.crt"], data["ca.crt"], "%s", name)
		first[name] = data["tls.crt"]
	}

	run()
	assert.Equal(t, ca, getSecret(t, kube, certs.CASecret), "the CA must be reused")
	require.NoError(t, caBundleIs(kube, ca["tls.crt"]))
	for _, name := range tlsSecrets {
		assert.NotEqual(t, first[name], getSecret(t, kube, name)["tls.crt"], "%s must be renewed", name)
	}
}

// checkWiredPod: the mutating webhook, called by the API server through the Service, wires a
// checkpoint-enabled pod with the tools init-container running the agent image that the manifests
// set (STASIS_TOOLS_IMAGE follows the DaemonSet's image).
func checkWiredPod(t *testing.T, kube kubernetes.Interface) {
	t.Helper()
	ctx := context.Background()
	ds, err := kube.AppsV1().DaemonSets(ns).Get(ctx, "stasis-agent", metav1.GetOptions{})
	require.NoError(t, err)
	agentImage := ds.Spec.Template.Spec.Containers[0].Image
	_, err = kube.CoreV1().PersistentVolumeClaims("deploy-test").Create(ctx, &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "ckpt"},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources:   corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}},
		},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	pod, err := kube.CoreV1().Pods("deploy-test").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "wired", Labels: map[string]string{
			"memverge.ai/checkpoint-mode":           "true",
			"memverge.ai/checkpoint-storage-volume": "ckpt",
		}},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app:1", Command: []string{"/app"}}},
			Volumes: []corev1.Volume{{Name: "ckpt", VolumeSource: corev1.VolumeSource{
				PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "ckpt"}}}},
		},
	}, metav1.CreateOptions{})
	require.NoError(t, err, "a checkpoint-enabled pod must be admitted through the webhook")
	var tools *corev1.Container
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == wiring.ToolsInitContainer {
			tools = &pod.Spec.InitContainers[i]
		}
	}
	require.NotNil(t, tools, "the pod was not wired (no %s init-container): %+v", wiring.ToolsInitContainer, pod.Spec.InitContainers)
	assert.Equal(t, agentImage, tools.Image, "the tools init-container runs the agent image of the manifests")
	assert.True(t, wiring.Wrapped(pod.Spec.Containers[0].Command), "the app runs under the launcher: %v", pod.Spec.Containers[0].Command)
}
