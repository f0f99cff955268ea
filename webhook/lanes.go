package webhook

import (
	"context"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	appsv1listers "k8s.io/client-go/listers/apps/v1"

	"github.com/stasis-k8s/stasis/webhook/catalog"
)

// lane is one bulkhead: the API client (with its own rate limiter) and the catalog store that one
// kind of work uses. Pod-creation reviews, eviction/suspend reviews and the background work (PVC
// controller) each have their own lane, so that a flood of pod creations cannot spend the tokens
// an eviction needs (issue 13: one shared client at 5 QPS blocked every drain for minutes).
//
// Reads come from the informer caches; the client is for writes and for the few reads that must
// be live (an owner not yet in the cache, a claim written a moment ago), each one call under the
// review's deadline.
type lane struct {
	name   string
	client kubernetes.Interface
	store  *catalog.Store
	rs     appsv1listers.ReplicaSetLister
	deploy appsv1listers.DeploymentLister
}

func newLane(name string, client kubernetes.Interface, d Deps, now func() time.Time) lane {
	return lane{name: name, client: client, store: &catalog.Store{Client: client, PVCs: d.PVCs, Now: now},
		rs: d.ReplicaSets, deploy: d.Deployments}
}

// replicaSet reads from the cache; a ReplicaSet not yet there (its first pods are created a moment
// after it) is read live, once.
func (l lane) replicaSet(ctx context.Context, ns, name string) (*appsv1.ReplicaSet, error) {
	if l.rs != nil {
		if rs, err := l.rs.ReplicaSets(ns).Get(name); err == nil {
			return rs, nil
		}
	}
	return l.client.AppsV1().ReplicaSets(ns).Get(ctx, name, metav1.GetOptions{})
}

// deployment reads from the cache, live when it is not there yet.
func (l lane) deployment(ctx context.Context, ns, name string) (*appsv1.Deployment, error) {
	if l.deploy != nil {
		if d, err := l.deploy.Deployments(ns).Get(name); err == nil {
			return d, nil
		}
	}
	return l.client.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{})
}
