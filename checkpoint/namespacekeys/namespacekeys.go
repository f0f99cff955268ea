// Package namespacekeys keeps each namespace's checkpoint key-encryption key (KEK) in a Secret of
// that namespace, so that the namespace owns its checkpoints' confidentiality: deleting the Secret
// makes every checkpoint of the namespace unreadable (crypto-shredding), and rotating it needs no
// rewrite of a checkpoint. It is the checkpoint.KEKSource of an agent that runs in a cluster.
//
// The Secret (SecretName, type SecretType) holds
//
//	current    the id of the key new checkpoints are wrapped with
//	key-<id>   32 random bytes, one entry per key still needed to unwrap older checkpoints
//
// The agent creates it on the first checkpoint of a namespace. The agents' RBAC grants get on
// that name only and create on Secrets; a ValidatingAdmissionPolicy (deploy/base) allows the
// agents to create nothing but this Secret, since RBAC cannot restrict create by name.
package namespacekeys

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// The Secret's name, type and fields.
const (
	SecretName   = "stasis-checkpoint-key"
	SecretType   = corev1.SecretType("stasis.dev/checkpoint-key")
	CurrentField = "current"
	KeyPrefix    = "key-"
	keyLen       = 32
)

var (
	errGone      = errors.New("the namespace's checkpoint key was deleted, so its checkpoints cannot be decrypted")
	errMalformed = errors.New("malformed checkpoint key Secret")
)

var validID = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,31}$`)

// Secrets reads (and on first use creates) the namespaces' key Secrets. A Secret read is used for
// TTL before it is read again, so a rotation or a deletion reaches every agent within TTL and a
// dump costs no API call in the common case.
type Secrets struct {
	client  kubernetes.Interface
	ttl     time.Duration
	timeout time.Duration

	mu    sync.Mutex
	cache map[string]keys
}

type keys struct {
	current string
	byID    map[string][]byte
	read    time.Time
}

// New returns the key source over client; ttl 0 means one minute.
func New(client kubernetes.Interface, ttl time.Duration) *Secrets {
	if ttl == 0 {
		ttl = time.Minute
	}
	return &Secrets{client: client, ttl: ttl, timeout: 5 * time.Second, cache: map[string]keys{}}
}

// Current is the KEK new checkpoints of namespace ns are wrapped with; the Secret is created when
// the namespace has none.
func (s *Secrets) Current(ns string) (string, []byte, error) {
	k, err := s.keys(ns, true, false)
	if err != nil {
		return "", nil, err
	}
	return k.current, k.byID[k.current], nil
}

// ByID is KEK id of namespace ns. An id not in the cached Secret is looked up once more live (a
// rotation on another node may be newer than this agent's copy).
func (s *Secrets) ByID(ns, id string) ([]byte, error) {
	k, err := s.keys(ns, false, false)
	if err == nil {
		if kek, ok := k.byID[id]; ok {
			return kek, nil
		}
		k, err = s.keys(ns, false, true)
	}
	if err != nil {
		return nil, err
	}
	if kek, ok := k.byID[id]; ok {
		return kek, nil
	}
	return nil, fmt.Errorf("key-encryption key %q is not in Secret %s/%s (rotated out or replaced): checkpoints wrapped with it cannot be decrypted", id, ns, SecretName)
}

// Forget drops the cached copy of ns (tests, and after an unwrap failure).
func (s *Secrets) Forget(ns string) {
	s.mu.Lock()
	delete(s.cache, ns)
	s.mu.Unlock()
}

func (s *Secrets) keys(ns string, create, fresh bool) (keys, error) {
	s.mu.Lock()
	k, ok := s.cache[ns]
	s.mu.Unlock()
	if ok && !fresh && time.Since(k.read) < s.ttl {
		return k, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	fetched, err := s.read(ctx, ns, create)
	if err != nil {
		// The API server unreachable (a partitioned node dumping on SIGTERM): a copy read before
		// still wraps and unwraps. A Secret seen deleted or malformed is never served from cache.
		if ok && !errors.Is(err, errGone) && !errors.Is(err, errMalformed) {
			return k, nil
		}
		return keys{}, err
	}
	k = fetched
	s.mu.Lock()
	s.cache[ns] = k
	s.mu.Unlock()
	return k, nil
}

func (s *Secrets) read(ctx context.Context, ns string, create bool) (keys, error) {
	sec, err := s.client.CoreV1().Secrets(ns).Get(ctx, SecretName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) && create {
		sec, err = s.create(ctx, ns)
	}
	if apierrors.IsNotFound(err) {
		return keys{}, fmt.Errorf("Secret %s/%s not found: %w", ns, SecretName, errGone)
	}
	if err != nil {
		return keys{}, fmt.Errorf("reading Secret %s/%s: %w", ns, SecretName, err)
	}
	k, err := parse(sec)
	if err != nil {
		return keys{}, fmt.Errorf("%w: %w", errMalformed, err)
	}
	return k, nil
}

// create makes the namespace's Secret with one random key. Two agents creating it at once: one
// wins, the other reads the winner's.
func (s *Secrets) create(ctx context.Context, ns string) (*corev1.Secret, error) {
	raw := make([]byte, keyLen)
	var idb [4]byte
	if _, err := rand.Read(raw); err != nil {
		return nil, err
	}
	_, _ = rand.Read(idb[:])
	id := "k" + time.Now().UTC().Format("20060102") + "-" + hex.EncodeToString(idb[:])
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: SecretName, Namespace: ns, Labels: map[string]string{"app.kubernetes.io/managed-by": "stasis"},
			Annotations: map[string]string{"stasis.dev/about": "encrypts this namespace's Stasis checkpoints; deleting it makes them unreadable (see docs/agent.md, Encryption at rest)"}},
		Type: SecretType,
		Data: map[string][]byte{CurrentField: []byte(id), KeyPrefix + id: raw},
	}
	created, err := s.client.CoreV1().Secrets(ns).Create(ctx, sec, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return s.client.CoreV1().Secrets(ns).Get(ctx, SecretName, metav1.GetOptions{})
	}
	if err != nil {
		return nil, fmt.Errorf("creating Secret %s/%s: %w", ns, SecretName, err)
	}
	return created, nil
}

// parse checks a Secret's shape; a malformed one is an error naming the field, never a key.
func parse(sec *corev1.Secret) (keys, error) {
	where := sec.Namespace + "/" + sec.Name
	if sec.Type != SecretType {
		return keys{}, fmt.Errorf("Secret %s: type %q, want %q", where, sec.Type, SecretType)
	}
	k := keys{current: string(sec.Data[CurrentField]), byID: map[string][]byte{}, read: time.Now()}
	for field, v := range sec.Data {
		if field == CurrentField {
			continue
		}
		id, ok := strings.CutPrefix(field, KeyPrefix)
		if !ok || !validID.MatchString(id) {
			return keys{}, fmt.Errorf("Secret %s: field %q: want %q or %s<id> (id: lowercase letters, digits, '-', at most 32)", where, field, CurrentField, KeyPrefix)
		}
		if len(v) != keyLen {
			return keys{}, fmt.Errorf("Secret %s: field %q: %d bytes, want %d random bytes", where, field, len(v), keyLen)
		}
		k.byID[id] = v
	}
	if k.current == "" {
		return keys{}, errors.New("Secret " + where + ": field \"current\" is missing: it names the key new checkpoints use")
	}
	if _, ok := k.byID[k.current]; !ok {
		return keys{}, fmt.Errorf("Secret %s: field \"current\" names %q but there is no field %s%s", where, k.current, KeyPrefix, k.current)
	}
	return k, nil
}
