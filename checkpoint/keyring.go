package checkpoint

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
)

// The keys of the checkpoint store. Every key descends from the manifest Key (itself derived from
// the agents' private TLS key, see KeyFromFile), each by HMAC-SHA256 with a label of its own, so
// that knowing one subkey gives nothing about another:
//
//	manifest MAC   Key                                          signs manifest.json (unchanged)
//	chunk naming   HMAC(Key, "stasis chunk name key v2 blake3")  keys the BLAKE3 naming a chunk
//	               HMAC(Key, "stasis chunk name key v1")         HMAC-SHA256 names of older packs
//	namespace KEK  HMAC(Key, "stasis kek v1\x00"+ns)             wraps the data keys of ns's checkpoints
//
// Each checkpoint draws a random 256-bit data key that encrypts the chunks it writes; the manifest
// holds it wrapped (AES-256-GCM) by its namespace's KEK, with the KEK's id. A chunk reused from an
// older checkpoint stays encrypted under that checkpoint's data key, so the manifest carries every
// wrapped key its chunks need (ChunkRef.Key indexes Pack.Keys).
//
// The KEK comes from a KEKSource. Today it is derived (DerivedKEKs); a Kubernetes Secret per
// namespace is a KEKSource that returns the Secret's current key for wrapping and any of its
// retained keys, by id, for unwrapping: rotating it needs no rewrite of a checkpoint (see
// docs/agent.md, "Encryption at rest").

// KEKSource supplies the key-encryption keys of namespaces.
type KEKSource interface {
	// Current is the KEK new checkpoints of namespace ns are wrapped with, and its id.
	Current(ns string) (id string, kek []byte, err error)
	// ByID is KEK id of namespace ns, for unwrapping an older checkpoint's data key.
	ByID(ns, id string) ([]byte, error)
}

// KeyRing holds the keys of the checkpoint store.
type KeyRing struct {
	manifest Key
	naming   []byte // HMAC-SHA256 chunk names (packs written before BLAKE3)
	naming3  []byte // keyed BLAKE3 chunk names
	keks     KEKSource
}

// NewKeyRing derives the store's keys from the manifest key; keks nil means DerivedKEKs.
func NewKeyRing(manifest Key, keks KEKSource) (*KeyRing, error) {
	if len(manifest) < 32 {
		return nil, fmt.Errorf("key ring: manifest key of %d bytes, want 32 or more", len(manifest))
	}
	if keks == nil {
		keks = DerivedKEKs{root: manifest}
	}
	return &KeyRing{manifest: manifest, naming: subkey(manifest, "stasis chunk name key v1"),
		naming3: subkey(manifest, "stasis chunk name key v2 blake3"), keks: keks}, nil
}

// KeyRingFromFile is NewKeyRing(KeyFromFile(path), nil): the agent's key file (export runs on the
// node as root with the same file).
func KeyRingFromFile(path string) (*KeyRing, error) {
	k, err := KeyFromFile(path)
	if err != nil {
		return nil, err
	}
	return NewKeyRing(k, nil)
}

// namer is the chunk namer of a pack's naming.
func (r *KeyRing) namer(naming string) chunkNamer {
	if naming == NamingBLAKE3 {
		return chunkNamer{naming: naming, key: r.naming3}
	}
	return chunkNamer{naming: naming, key: r.naming}
}

// Manifest is the key signing manifests.
func (r *KeyRing) Manifest() Key { return r.manifest }

func subkey(root []byte, label string) []byte {
	mac := hmac.New(sha256.New, root)
	io.WriteString(mac, label)
	return mac.Sum(nil)
}

// DerivedKEKs derives each namespace's KEK from the manifest key: one id, "derived-v1".
type DerivedKEKs struct{ root []byte }

const derivedKEKID = "derived-v1"

func (d DerivedKEKs) Current(ns string) (string, []byte, error) {
	return derivedKEKID, subkey(d.root, "stasis kek v1\x00"+ns), nil
}

func (d DerivedKEKs) ByID(ns, id string) ([]byte, error) {
	if id != derivedKEKID {
		return nil, fmt.Errorf("key-encryption key %q of namespace %q is unknown to this agent", id, ns)
	}
	_, k, err := d.Current(ns)
	return k, err
}

// WrappedKey is a checkpoint's data key as the manifest holds it.
type WrappedKey struct {
	// ID names the data key in chunk file names (16 hex digits, random).
	ID string `json:"id"`
	// KEK is the id of the namespace key that wraps it.
	KEK string `json:"kek"`
	// Wrapped is nonce ‖ AES-256-GCM(KEK, data key), additional data "stasis dk v1" ‖ ns ‖ ID.
	Wrapped []byte `json:"wrapped"`
}

// dataKey is an unwrapped data key.
type dataKey struct {
	id   string
	aead cipher.AEAD
}

func newAEAD(key []byte) (cipher.AEAD, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

func wrapAD(ns, id string) []byte { return []byte("stasis dk v1\x00" + ns + "\x00" + id) }

// newDataKey draws a data key for a checkpoint of namespace ns and wraps it.
func (r *KeyRing) newDataKey(ns string) (*dataKey, WrappedKey, error) {
	kekID, kek, err := r.keks.Current(ns)
	if err != nil {
		return nil, WrappedKey{}, err
	}
	raw := make([]byte, 32)
	var id [8]byte
	if _, err := rand.Read(raw); err != nil {
		return nil, WrappedKey{}, err
	}
	_, _ = rand.Read(id[:])
	wk := WrappedKey{ID: hex.EncodeToString(id[:]), KEK: kekID}
	ka, err := newAEAD(kek)
	if err != nil {
		return nil, WrappedKey{}, err
	}
	nonce := make([]byte, ka.NonceSize())
	_, _ = rand.Read(nonce)
	wk.Wrapped = ka.Seal(nonce, nonce, raw, wrapAD(ns, wk.ID))
	dk, err := newAEAD(raw)
	if err != nil {
		return nil, WrappedKey{}, err
	}
	return &dataKey{id: wk.ID, aead: dk}, wk, nil
}

// unwrap opens a wrapped data key of namespace ns.
func (r *KeyRing) unwrap(ns string, wk WrappedKey) (*dataKey, error) {
	if !validKeyID(wk.ID) {
		return nil, fmt.Errorf("data key id %q: not 16 hex digits", wk.ID)
	}
	kek, err := r.keks.ByID(ns, wk.KEK)
	if err != nil {
		return nil, err
	}
	ka, err := newAEAD(kek)
	if err != nil {
		return nil, err
	}
	if len(wk.Wrapped) < ka.NonceSize() {
		return nil, fmt.Errorf("data key %s: wrapped key too short", wk.ID)
	}
	n := ka.NonceSize()
	raw, err := ka.Open(nil, wk.Wrapped[:n], wk.Wrapped[n:], wrapAD(ns, wk.ID))
	if err != nil {
		return nil, fmt.Errorf("data key %s: cannot be unwrapped with key-encryption key %q of namespace %q (another cluster's key, or altered)", wk.ID, wk.KEK, ns)
	}
	dk, err := newAEAD(raw)
	if err != nil {
		return nil, err
	}
	return &dataKey{id: wk.ID, aead: dk}, nil
}

func validKeyID(id string) bool {
	b, err := hex.DecodeString(id)
	return err == nil && len(b) == 8 && hex.EncodeToString(b) == id
}

// errNoKeyRing: the pack needs keys (naming is keyed even without encryption).
var errNoKeyRing = errors.New("the checkpoint store needs the agents' key ring")
