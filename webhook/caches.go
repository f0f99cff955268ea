package webhook

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/rs/zerolog"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	klabels "k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	informerscorev1 "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	appsv1listers "k8s.io/client-go/listers/apps/v1"
	corev1listers "k8s.io/client-go/listers/core/v1"
	policyv1listers "k8s.io/client-go/listers/policy/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/labels"

	"github.com/stasis-k8s/stasis/internal/serving"
)

// caches are the informers every review reads instead of the API server (issue 13: one GET per
// review throttled admission to the client's rate limit). They are started before the server and
// the webhook reports ready, and answers reviews, only once all have synced.
type caches struct {
	pods      informerscorev1.PodInformer // checkpoint-enabled pods only
	pvcs      informerscorev1.PersistentVolumeClaimInformer
	pdbs      policyv1listers.PodDisruptionBudgetLister
	rs        appsv1listers.ReplicaSetLister
	deploy    appsv1listers.DeploymentLister
	nodes     corev1listers.NodeLister
	locate    Locator
	hasSynced []cache.InformerSynced
}

func (c *caches) synced() bool {
	for _, s := range c.hasSynced {
		if !s() {
			return false
		}
	}
	return true
}

// startCaches starts the informers. Objects are trimmed before they are stored (managedFields
// always; PVCs keep only their metadata, where records and claims live; ReplicaSets and
// Deployments their metadata and replica count), which keeps the caches small on large clusters.
func startCaches(ctx context.Context, client kubernetes.Interface, prefix string, f runFlags) (*caches, error) {
	c := &caches{}
	// Pods: only checkpoint-enabled ones (the mutating webhook only wires labelled pods).
	podFactory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.LabelSelector = labels.Key(prefix, labels.Mode) + "=true"
	}), informers.WithTransform(trim))
	c.pods = podFactory.Core().V1().Pods()
	all := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTransform(trim))
	c.pvcs = all.Core().V1().PersistentVolumeClaims()
	pdbInf, rsInf, deployInf := all.Policy().V1().PodDisruptionBudgets(), all.Apps().V1().ReplicaSets(), all.Apps().V1().Deployments()
	nodeInf := all.Core().V1().Nodes()
	c.pdbs, c.rs, c.deploy, c.nodes = pdbInf.Lister(), rsInf.Lister(), deployInf.Lister(), nodeInf.Lister()
	c.hasSynced = []cache.InformerSynced{c.pods.Informer().HasSynced, c.pvcs.Informer().HasSynced,
		pdbInf.Informer().HasSynced, rsInf.Informer().HasSynced, deployInf.Informer().HasSynced, nodeInf.Informer().HasSynced}

	if f.agentEndpoint != "" {
		c.locate = StaticLocator(strings.TrimRight(f.agentEndpoint, "/"))
	} else {
		sel, err := klabels.Parse(f.agentSelector)
		if err != nil {
			return nil, fmt.Errorf("--agent-selector: %w", err)
		}
		agentFactory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(f.agentNS),
			informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = sel.String() }))
		agentInf := agentFactory.Core().V1().Pods()
		c.hasSynced = append(c.hasSynced, agentInf.Informer().HasSynced)
		c.locate = PodLocator{Pods: agentInf.Lister().Pods(f.agentNS), Selector: sel, Port: f.agentPort}
		agentFactory.Start(ctx.Done())
	}
	podFactory.Start(ctx.Done())
	all.Start(ctx.Done())
	return c, nil
}

// trim keeps what the webhook reads of PVCs, ReplicaSets, Deployments and Nodes.
func trim(obj any) (any, error) {
	if m, ok := obj.(metav1.Object); ok {
		m.SetManagedFields(nil)
	}
	switch o := obj.(type) {
	case *corev1.PersistentVolumeClaim:
		// Metadata only: records and claims are annotations; the PVC controller asks only whether
		// a PVC exists.
		return &corev1.PersistentVolumeClaim{TypeMeta: o.TypeMeta, ObjectMeta: o.ObjectMeta}, nil
	case *appsv1.ReplicaSet:
		return &appsv1.ReplicaSet{TypeMeta: o.TypeMeta, ObjectMeta: o.ObjectMeta, Spec: appsv1.ReplicaSetSpec{Replicas: o.Spec.Replicas}}, nil
	case *appsv1.Deployment:
		return &appsv1.Deployment{TypeMeta: o.TypeMeta, ObjectMeta: o.ObjectMeta, Spec: appsv1.DeploymentSpec{Replicas: o.Spec.Replicas}}, nil
	case *corev1.Node:
		// The Ready condition alone (nodes.go): no images, addresses or other conditions.
		n := &corev1.Node{TypeMeta: o.TypeMeta, ObjectMeta: metav1.ObjectMeta{Name: o.Name, UID: o.UID, ResourceVersion: o.ResourceVersion}}
		for _, c := range o.Status.Conditions {
			if c.Type == corev1.NodeReady {
				n.Status.Conditions = []corev1.NodeCondition{c}
			}
		}
		return n, nil
	}
	return obj, nil
}

// agentClient builds the mTLS client to the agents: their CA, the fixed server name, and the
// webhook's client certificate (reloaded when it changes).
func agentClient(ctx context.Context, endpoint, caFile, certFile, keyFile string, log zerolog.Logger) (*agentapi.Client, error) {
	if strings.HasPrefix(endpoint, "http://") {
		return agentapi.NewClient(nil, 10*time.Second), nil
	}
	if caFile == "" {
		return nil, errors.New("--agent-ca-file is required to verify the agents (or an http:// --agent-endpoint for tests)")
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("--agent-ca-file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--agent-ca-file %s holds no PEM certificate", caFile)
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool, ServerName: agentapi.ServerName}
	if certFile != "" || keyFile != "" {
		if certFile == "" || keyFile == "" {
			return nil, errors.New("--agent-cert-file and --agent-key-file go together")
		}
		src, err := serving.NewCertSource(certFile, keyFile, "")
		if err != nil {
			return nil, fmt.Errorf("--agent-cert-file/--agent-key-file: %w", err)
		}
		tc.GetClientCertificate = src.GetClientCertificate
	}
	return agentapi.NewClient(tc, 10*time.Second), nil
}
