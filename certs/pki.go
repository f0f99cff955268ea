// Package certs makes Stasis' TLS material for clusters without cert-manager: the same CA, Secrets
// and caBundle that deploy/cert-manager.yaml asks cert-manager for, so both install paths end in
// identical pods. `stasis certs` writes them as files (for the no-cert-manager kustomize overlay)
// and/or applies them to a cluster.
package certs

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"time"

	"github.com/stasis-k8s/stasis/agentapi"
)

// Secret names and the key names inside them: those of cert-manager's Certificates
// (deploy/cert-manager.yaml), which the Deployment and DaemonSet mount.
const (
	WebhookSecret     = "stasis-webhook-tls"
	AgentSecret       = "stasis-agent-tls"
	AgentClientSecret = "stasis-agent-client-tls"

	KeyCert = "tls.crt"
	KeyKey  = "tls.key"
	KeyCA   = "ca.crt"

	// CACommonName is the subject of the CA (the cert-manager path uses the same).
	CACommonName = "stasis-ca"
)

// Pair is a certificate and its private key, PEM-encoded.
type Pair struct {
	CertPEM []byte
	KeyPEM  []byte
}

// Secret is one kubernetes.io/tls Secret: tls.crt, tls.key and ca.crt.
type Secret struct {
	Name string
	Data map[string][]byte
}

// Bundle is everything one run produces.
type Bundle struct {
	CA      Pair
	Secrets []Secret
}

// CABundle is the PEM the API server must trust for the webhook (the CA certificate).
func (b Bundle) CABundle() []byte { return b.CA.CertPEM }

// Request says what to issue.
type Request struct {
	Namespace string // where the Service and Secrets live
	Service   string // the webhook Service name
	// Validity of the leaf certificates; rerun `stasis certs` (same CA) before they expire.
	Validity time.Duration
	// CAValidity of a newly created CA.
	CAValidity time.Duration
	Now        time.Time
}

func (r *Request) defaults() {
	if r.Namespace == "" {
		r.Namespace = "stasis-system"
	}
	if r.Service == "" {
		r.Service = "stasis-webhook"
	}
	if r.Validity == 0 {
		r.Validity = 365 * 24 * time.Hour
	}
	if r.CAValidity == 0 {
		r.CAValidity = 10 * 365 * 24 * time.Hour
	}
	if r.Now.IsZero() {
		r.Now = time.Now()
	}
}

// WebhookDNSNames are the names the API server may use for the webhook Service.
func WebhookDNSNames(namespace, service string) []string {
	return []string{
		service,
		service + "." + namespace,
		service + "." + namespace + ".svc",
		service + "." + namespace + ".svc.cluster.local",
	}
}

// NewCA creates a self-signed CA.
func NewCA(now time.Time, validity time.Duration) (Pair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Pair{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: CACommonName},
		NotBefore:             now.Add(-5 * time.Minute), // clock skew between nodes
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return Pair{}, err
	}
	return encodePair(der, key)
}

// Issue creates the three leaf Secrets signed by ca.
func Issue(ca Pair, req Request) (Bundle, error) {
	req.defaults()
	caCert, caKey, err := parseCA(ca)
	if err != nil {
		return Bundle{}, err
	}
	leaves := []struct {
		secret string
		cn     string
		dns    []string
		usage  x509.ExtKeyUsage
	}{
		{WebhookSecret, req.Service + "." + req.Namespace + ".svc", WebhookDNSNames(req.Namespace, req.Service), x509.ExtKeyUsageServerAuth},
		{AgentSecret, agentapi.ServerName, []string{agentapi.ServerName}, x509.ExtKeyUsageServerAuth},
		{AgentClientSecret, agentapi.WebhookIdentity, []string{agentapi.WebhookIdentity}, x509.ExtKeyUsageClientAuth},
	}
	b := Bundle{CA: ca}
	for _, l := range leaves {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return Bundle{}, err
		}
		notAfter := req.Now.Add(req.Validity)
		if notAfter.After(caCert.NotAfter) {
			// A leaf outliving its CA would fail verification first: say so now.
			return Bundle{}, fmt.Errorf("certificate %s would expire after its CA (CA valid until %s): use a shorter --validity or a new CA",
				l.secret, caCert.NotAfter.UTC().Format(time.RFC3339))
		}
		tmpl := &x509.Certificate{
			SerialNumber: serial(),
			Subject:      pkix.Name{CommonName: l.cn},
			DNSNames:     l.dns,
			NotBefore:    req.Now.Add(-5 * time.Minute),
			NotAfter:     notAfter,
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{l.usage},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey)
		if err != nil {
			return Bundle{}, fmt.Errorf("certificate %s: %w", l.secret, err)
		}
		p, err := encodePair(der, key)
		if err != nil {
			return Bundle{}, err
		}
		b.Secrets = append(b.Secrets, Secret{Name: l.secret, Data: map[string][]byte{
			KeyCert: p.CertPEM, KeyKey: p.KeyPEM, KeyCA: ca.CertPEM,
		}})
	}
	return b, nil
}

func parseCA(ca Pair) (*x509.Certificate, crypto.Signer, error) {
	pair, err := tls.X509KeyPair(ca.CertPEM, ca.KeyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("CA: certificate and key do not form a pair: %w", err)
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, nil, fmt.Errorf("CA certificate: %w", err)
	}
	if !cert.IsCA {
		return nil, nil, errors.New("CA certificate: not a CA (basicConstraints CA:FALSE)")
	}
	signer, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, nil, errors.New("CA key: not a signing key")
	}
	return cert, signer, nil
}

func encodePair(der []byte, key *ecdsa.PrivateKey) (Pair, error) {
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return Pair{}, err
	}
	return Pair{
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}),
	}, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return n
}

// SecretManifests renders the Secrets as a multi-document YAML stream for `kubectl apply -f`.
func SecretManifests(namespace string, secrets []Secret) []byte {
	var buf bytes.Buffer
	for i, s := range secrets {
		if i > 0 {
			buf.WriteString("---\n")
		}
		fmt.Fprintf(&buf, "apiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: %s\n", s.Name, namespace)
		buf.WriteString("  labels:\n    app.kubernetes.io/part-of: stasis\n    app.kubernetes.io/managed-by: stasis-certs\n")
		buf.WriteString("type: kubernetes.io/tls\ndata:\n")
		for _, k := range []string{KeyCA, KeyCert, KeyKey} {
			fmt.Fprintf(&buf, "  %s: %s\n", k, b64(s.Data[k]))
		}
	}
	return buf.Bytes()
}
