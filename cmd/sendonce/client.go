package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
)

// apiClient talks to a running server for the client commands.
type apiClient struct {
	base  string
	token string
	http  *http.Client
}

func addServerFlag(cmd *cobra.Command, server *string) {
	def := os.Getenv("SENDONCE_SERVER")
	if def == "" {
		def = "http://127.0.0.1:7070"
	}
	cmd.Flags().StringVar(server, "server", def, "server URL (env SENDONCE_SERVER); the token comes from SENDONCE_TOKEN")
}

func newAPIClient(server string) (*apiClient, error) {
	u, err := url.Parse(server)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("--server %q is not an http:// or https:// URL", server)
	}
	return &apiClient{base: strings.TrimRight(server, "/"), token: os.Getenv("SENDONCE_TOKEN"), http: &http.Client{Timeout: 30 * time.Second}}, nil
}

// apiError is an error answer from the server.
type apiError struct {
	Status int
	Code   string `json:"code"`
	Msg    string `json:"message"`
	Field  string `json:"field"`
}

func (e *apiError) Error() string {
	s := fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Msg)
	if e.Field != "" && !strings.Contains(e.Msg, e.Field) {
		s += " (field " + e.Field + ")"
	}
	return s
}

func (c *apiClient) do(ctx context.Context, method, path string, hdr map[string]string, body, out any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("cannot reach the server at %s (is `sendonce serve` running? set --server or SENDONCE_SERVER): %w", c.base, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp, err
	}
	if resp.StatusCode >= 300 {
		var eb struct {
			Error apiError `json:"error"`
		}
		if json.Unmarshal(data, &eb) != nil || eb.Error.Code == "" {
			return resp, fmt.Errorf("server answered %s: %s", resp.Status, strings.TrimSpace(string(data)))
		}
		eb.Error.Status = resp.StatusCode
		return resp, &eb.Error
	}
	if out != nil {
		return resp, json.Unmarshal(data, out)
	}
	return resp, nil
}

// record is the subset of the API's record the commands print.
type record struct {
	Key        string     `json:"key"`
	State      string     `json:"state"`
	MessageID  string     `json:"message_id"`
	From       string     `json:"from"`
	To         []string   `json:"to"`
	Subject    string     `json:"subject"`
	Attempts   int        `json:"attempts"`
	Duplicates int64      `json:"duplicates"`
	LastError  string     `json:"last_error"`
	Reply      string     `json:"reply"`
	ResolvedBy string     `json:"resolved_by"`
	Source     string     `json:"source"`
	CreatedAt  time.Time  `json:"created_at"`
	UpdatedAt  time.Time  `json:"updated_at"`
	SentAt     *time.Time `json:"sent_at"`
}

func printRecord(w io.Writer, r record) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "key:\t%s\n", r.Key)
	fmt.Fprintf(tw, "state:\t%s\n", r.State)
	fmt.Fprintf(tw, "message_id:\t%s\n", r.MessageID)
	fmt.Fprintf(tw, "from:\t%s\n", r.From)
	fmt.Fprintf(tw, "to:\t%s\n", strings.Join(r.To, ", "))
	fmt.Fprintf(tw, "subject:\t%s\n", r.Subject)
	fmt.Fprintf(tw, "attempts:\t%d\n", r.Attempts)
	fmt.Fprintf(tw, "duplicates:\t%d\n", r.Duplicates)
	if r.LastError != "" {
		fmt.Fprintf(tw, "last_error:\t%s\n", r.LastError)
	}
	if r.Reply != "" {
		fmt.Fprintf(tw, "reply:\t%s\n", r.Reply)
	}
	if r.ResolvedBy != "" {
		fmt.Fprintf(tw, "resolved_by:\t%s\n", r.ResolvedBy)
	}
	fmt.Fprintf(tw, "created_at:\t%s\n", r.CreatedAt.Format(time.RFC3339))
	if r.SentAt != nil {
		fmt.Fprintf(tw, "sent_at:\t%s\n", r.SentAt.Format(time.RFC3339))
	}
	tw.Flush()
}

func newSend() *cobra.Command {
	var server, key, from, subject, text, html string
	var to, cc, bcc []string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "send --key KEY --from ADDR --to ADDR --subject S [--text T]",
		Short: "Submit an email through the API; repeating it with the same key sends nothing twice",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := newAPIClient(server)
			if err != nil {
				return err
			}
			email := map[string]any{"from": from, "to": to, "subject": subject}
			for k, v := range map[string]any{"cc": cc, "bcc": bcc} {
				if l := v.([]string); len(l) > 0 {
					email[k] = l
				}
			}
			if text != "" {
				email["text"] = text
			}
			if html != "" {
				email["html"] = html
			}
			var r record
			resp, err := c.do(cmd.Context(), http.MethodPost, "/v1/emails", map[string]string{"Idempotency-Key": key}, email, &r)
			if err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(r)
			}
			if resp.StatusCode == http.StatusOK {
				fmt.Fprintf(cmd.OutOrStdout(), "duplicate: key %q was already accepted (suppressed %d times); nothing new will be sent\n", key, r.Duplicates)
			} else {
				fmt.Fprintf(cmd.OutOrStdout(), "accepted: key %q, message %s\n", key, r.MessageID)
			}
			printRecord(cmd.OutOrStdout(), r)
			return nil
		},
	}
	addServerFlag(cmd, &server)
	f := cmd.Flags()
	f.StringVar(&key, "key", "", "idempotency key (required): the same key is the same email")
	f.StringVar(&from, "from", "", "sender, e.g. \"Difio <noreply@example.org>\" (required)")
	f.StringSliceVar(&to, "to", nil, "recipient (repeatable)")
	f.StringSliceVar(&cc, "cc", nil, "Cc recipient (repeatable)")
	f.StringSliceVar(&bcc, "bcc", nil, "Bcc recipient (repeatable)")
	f.StringVar(&subject, "subject", "", "subject (required)")
	f.StringVar(&text, "text", "", "plain-text body")
	f.StringVar(&html, "html", "", "HTML body")
	f.BoolVar(&asJSON, "json", false, "print the record as JSON")
	for _, name := range []string{"key", "from", "subject"} {
		_ = cmd.MarkFlagRequired(name)
	}
	return cmd
}

func newStatus() *cobra.Command {
	var server string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status KEY",
		Short: "Show the record of one email",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := newAPIClient(server)
			if err != nil {
				return err
			}
			var r record
			if _, err := c.do(cmd.Context(), http.MethodGet, "/v1/emails/"+url.PathEscape(args[0]), nil, nil, &r); err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(r)
			}
			printRecord(cmd.OutOrStdout(), r)
			return nil
		},
	}
	addServerFlag(cmd, &server)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the record as JSON")
	return cmd
}

func newList() *cobra.Command {
	var server, state, keyPrefix, recipient string
	var limit int
	var all, asJSON bool
	cmd := &cobra.Command{
		Use:   "list [--state STATE] [--key-prefix P] [--recipient ADDR]",
		Short: "List emails, newest first, as a table or JSON",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := newAPIClient(server)
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			if !asJSON {
				fmt.Fprintln(tw, "KEY\tSTATE\tATTEMPTS\tDUPLICATES\tCREATED\tTO\tSUBJECT")
			}
			var out []record
			cursor := ""
			for {
				q := url.Values{"limit": {fmt.Sprint(limit)}}
				for k, v := range map[string]string{"state": state, "key_prefix": keyPrefix, "recipient": recipient, "cursor": cursor} {
					if v != "" {
						q.Set(k, v)
					}
				}
				var page struct {
					Emails     []record `json:"emails"`
					NextCursor string   `json:"next_cursor"`
				}
				if _, err := c.do(cmd.Context(), http.MethodGet, "/v1/emails?"+q.Encode(), nil, nil, &page); err != nil {
					return err
				}
				out = append(out, page.Emails...)
				for _, r := range page.Emails {
					if !asJSON {
						fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\t%s\t%s\n", r.Key, r.State, r.Attempts, r.Duplicates,
							r.CreatedAt.Local().Format("2006-01-02 15:04:05"), strings.Join(r.To, ","), r.Subject)
					}
				}
				cursor = page.NextCursor
				if !all || cursor == "" {
					break
				}
			}
			if asJSON {
				if out == nil {
					out = []record{}
				}
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(out)
			}
			return tw.Flush()
		},
	}
	addServerFlag(cmd, &server)
	cmd.Flags().StringVar(&state, "state", "", "only this state: queued, sending, sent, failed or in_doubt")
	cmd.Flags().StringVar(&keyPrefix, "key-prefix", "", "only keys starting with this")
	cmd.Flags().StringVar(&recipient, "recipient", "", "only emails to this address")
	cmd.Flags().IntVar(&limit, "limit", 50, "emails per page (1-1000)")
	cmd.Flags().BoolVar(&all, "all", false, "follow the cursor through every page")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON array of records")
	return cmd
}

func newResolve() *cobra.Command {
	var server, action string
	cmd := &cobra.Command{
		Use:   "resolve KEY --action resend|mark_sent|fail",
		Short: "Settle an in-doubt email",
		Long: `Settle an email whose delivery outcome is unknown (state in_doubt):
  resend     deliver it again, with the same Message-ID
  mark_sent  the recipient's server had it
  fail       give up on it`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := newAPIClient(server)
			if err != nil {
				return err
			}
			var r record
			if _, err := c.do(cmd.Context(), http.MethodPost, "/v1/emails/"+url.PathEscape(args[0])+"/resolve", nil, map[string]string{"action": action}, &r); err != nil {
				return err
			}
			printRecord(cmd.OutOrStdout(), r)
			return nil
		},
	}
	addServerFlag(cmd, &server)
	cmd.Flags().StringVar(&action, "action", "", "resend, mark_sent or fail (required)")
	_ = cmd.MarkFlagRequired("action")
	return cmd
}
