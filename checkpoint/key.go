package checkpoint

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// Key authenticates manifests: the completion marker of a checkpoint the agent writes is
// "hmac-sha256:<HMAC of manifest.json>". A pod can write anything on its checkpoint volume, a
// whole checkpoint included; the agent restores only what it wrote itself, because what it
// restores runs with what the images say (credentials, capabilities, mounts), restored by root.
// No pod, and not the webhook, holds the key.
type Key []byte

// ErrNotAuthentic is a checkpoint whose manifest is not signed with the agents' key: written by
// something else than a Stasis agent of this cluster, or changed since.
var ErrNotAuthentic = errors.New("the manifest is not signed by this cluster's Stasis agents")

const hmacPrefix = "hmac-sha256:"

// KeyFromFile derives the manifest key from a secret file only the agents can read (the agents'
// private TLS key, which cert-manager keeps across renewals: rotationPolicy Never).
func KeyFromFile(path string) (Key, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("manifest key: %w", err)
	}
	if len(b) < 32 {
		return nil, fmt.Errorf("manifest key %s: %d bytes, too short to be a secret", path, len(b))
	}
	mac := hmac.New(sha256.New, b)
	io.WriteString(mac, "stasis checkpoint manifest key v1")
	return Key(mac.Sum(nil)), nil
}

// marker is the completion marker of a manifest: its HMAC, or its sha256 without a key.
func (k Key) marker(manifest []byte) string {
	if k == nil {
		sum := sha256.Sum256(manifest)
		return hex.EncodeToString(sum[:])
	}
	mac := hmac.New(sha256.New, k)
	mac.Write(manifest)
	return hmacPrefix + hex.EncodeToString(mac.Sum(nil))
}

// check compares a marker with the manifest. With a key only an HMAC marker passes.
func (k Key) check(marker string, manifest []byte) error {
	marker = strings.TrimSpace(marker)
	if k != nil && !strings.HasPrefix(marker, hmacPrefix) {
		return ErrNotAuthentic
	}
	if !hmac.Equal([]byte(marker), []byte(k.marker(manifest))) {
		if k != nil {
			return ErrNotAuthentic
		}
		return fmt.Errorf("manifest.json does not match the completion marker (corrupt manifest)")
	}
	return nil
}
