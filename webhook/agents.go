package webhook

import (
	"fmt"
	"net"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	klabels "k8s.io/apimachinery/pkg/labels"
	corev1listers "k8s.io/client-go/listers/core/v1"
)

// StaticLocator sends every node's requests to one agent URL (--agent-endpoint; tests use it with
// a fake agent).
type StaticLocator string

// URL returns the fixed endpoint.
func (s StaticLocator) URL(string) (string, error) { return string(s), nil }

// PodLocator finds the agent of a node among the agent pods (informer on --agent-namespace and
// --agent-selector): https://<podIP>:<port> of the running, ready agent pod on that node.
type PodLocator struct {
	Pods     corev1listers.PodNamespaceLister
	Selector klabels.Selector
	Port     int
}

// URL returns the node's agent.
func (l PodLocator) URL(node string) (string, error) {
	if node == "" {
		return "", fmt.Errorf("pod is not scheduled to a node")
	}
	pods, err := l.Pods.List(l.Selector)
	if err != nil {
		return "", err
	}
	for _, p := range pods {
		if p.Spec.NodeName == node && p.Status.PodIP != "" && p.DeletionTimestamp == nil && podReady(p) {
			return "https://" + net.JoinHostPort(p.Status.PodIP, strconv.Itoa(l.Port)), nil
		}
	}
	return "", fmt.Errorf("%w: no ready Stasis agent on node %s (selector %s)", errAgentUnavailable, node, l.Selector)
}

func podReady(p *corev1.Pod) bool {
	return p.Status.Phase == corev1.PodRunning && podIsReady(p)
}
